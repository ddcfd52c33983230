"""The run folder's layout and the naming rules, in one place.

Every path inside a run folder, every shard name, the key -> shard rule, the stage order with each
stage's drop reasons, the image extensions and URL host parsing are defined here and imported
everywhere else; no other module spells a path segment or a shard format.

    RUN/
      run.json, config.json, lease.json    the driver's records (engine.runfolder)
      logs/NNN.log                         one log per command
      metadata/                            shards/NNNNN.parquet (download inputs), parts of the
                                           scan (kept/, drops/, urlhash/, dupes/), lists/,
                                           inputs.parquet, summary.json
      download/retry/NNNNN.parquet         inputs of --retry-failed rounds
      download/pieces/                     parts of raw shards whose worker died, downloaded apart
      raw/NNNNN.{tar,parquet}, NNNNN_stats.json   img2dataset's output
      faces/NNNNN.parquet, select/NNNNN.parquet   one per raw shard
      dedup/                               samples/, reference/, bands/, pairs/ (steps),
                                           decisions.parquet, drops.parquet
      emit/                                members/, dataset.json (pending)
      dataset/                             the published dataset (laionface.dataset.contract)
      audit/                               funnel.parquet, shards.parquet, report.html
      STEP/_done/SHARD.json                the completion marker of each shard of a step
                                           (written and read by laionface.engine only)

Shards are numbered as img2dataset numbers them: SHARD_DIGITS zero-padded digits. A sample key is
img2dataset's: the shard number, then the row index in SHARD_INDEX digits (`split_key`).
"""

from __future__ import annotations

import math
import re

import pyarrow as pa
import pyarrow.compute as pc

from laionface.io import storage

# ---------------------------------------------------------------------------------------------
# Shards and keys

SHARD_DIGITS = 5  # img2dataset's oom_shard_count
MIN_SAMPLES_PER_SHARD = 10_000  # gives img2dataset's usual 9-digit keys


def shard_name(number: int) -> str:
    """`3` -> `"00003"`: the name of shard 3 in every folder of a run and in a dataset."""
    return f"{number:0{SHARD_DIGITS}d}"


def shard_of_file(url: str) -> str:
    """`.../raw/00003.parquet` -> `"00003"`: the shard a file belongs to (its name up to the
    first dot; `00003_stats.json` is not a shard file)."""
    return url.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]


def samples_per_shard(rows_per_shard: int) -> int:
    """img2dataset's `number_sample_per_shard` for a run: it sets the digits of a key's index."""
    return max(MIN_SAMPLES_PER_SHARD, int(rows_per_shard))


def index_digits(samples: int) -> int:
    """Digits of the row index in a key, as img2dataset's Downloader computes them."""
    return math.ceil(math.log10(samples))


def split_key(key: str, samples: int) -> tuple[int, int]:
    """(shard number, row index in that shard) of an img2dataset key."""
    return divmod(int(key), 10 ** index_digits(samples))


def key_prefix(shard: str) -> str:
    """What every key of raw shard `shard` starts with: its name (img2dataset writes the shard
    number, zero-padded, before the row index)."""
    return shard


def key_shards(keys: pa.Array | pa.ChunkedArray, samples: int) -> pa.Array:
    """The shard name of each key (vectorised `split_key`)."""
    numbers = pc.divide(pc.cast(keys, pa.int64()), 10 ** index_digits(samples))
    return pc.utf8_lpad(pc.cast(numbers, pa.string()), SHARD_DIGITS, "0")


# ---------------------------------------------------------------------------------------------
# Stages and the reasons each drops a row for

STAGE_ORDER = ("metadata", "download", "faces", "select", "dedup", "emit")

# Metadata filters, in the order they are checked (stages.metadata documents each).
METADATA_REASONS = (
    "null_url",
    "null_caption",
    "id_list",
    "exclude_list",
    "url_scheme",
    "blocked_domain",
    "license",
    "nsfw",
    "max_punsafe",
    "max_pwatermark",
    "min_similarity",
    "min_side",
    "max_side",
    "max_aspect_ratio",
    "min_caption_chars",
    "max_caption_chars",
    "duplicate_url",
)
# Every failed download's error_category is one of these (stages.download.categories).
DOWNLOAD_CATEGORIES = (
    "http_404",
    "http_4xx",
    "http_5xx",
    "timeout",
    "dns",
    "connection",
    "not_an_image",
    "too_small",
    "too_large",
    "bad_aspect_ratio",
    "opted_out",
    "blocked_address",
    "rate_limited",
    "too_many_pixels",
    "worker_died",
    "other",
)
# Download failures worth trying again later (--retry-failed): the same request may succeed.
TRANSIENT_CATEGORIES = ("timeout", "connection", "http_5xx", "dns", "rate_limited")
# Select's rules, in the order they are checked (laionface.selection).
SELECT_REASONS = (
    "decode_error",
    "image_too_small",
    "no_face",
    "low_score",
    "too_many_faces",
    "face_too_small",
)
DEDUP_REASONS = ("exact_duplicate", "near_duplicate", "eval_overlap")

DROP_REASONS = {
    "metadata": METADATA_REASONS,
    "download": DOWNLOAD_CATEGORIES,
    "faces": (),
    "select": SELECT_REASONS,
    "dedup": DEDUP_REASONS,
    "emit": (),
}

# ---------------------------------------------------------------------------------------------
# Images and URLs

# Tar members read as images (the extensions img2dataset and webdataset use for images).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")

# scheme://[userinfo@]host[:port]...; an IPv6 host keeps its brackets.
HOST_PATTERN = r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^@/?#]*@)?(?P<host>\[[^\]/]*\]|[^:/?#]*)"
_HOST = re.compile(HOST_PATTERN)


def is_image_name(name: str) -> bool:
    """Whether a file or member name has one of IMAGE_EXTENSIONS (any case)."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def url_host(url: str) -> str | None:
    """The host of a URL, lower case (IPv6 in brackets); None when it is not a URL."""
    match = _HOST.match(url or "")
    return match.group("host").lower() if match else None


def url_hosts(urls: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`url_host` of each URL (vectorised; null where it is not a URL)."""
    hosts = pc.struct_field(pc.extract_regex(urls, HOST_PATTERN), "host")
    return pc.utf8_lower(hosts)


# ---------------------------------------------------------------------------------------------
# Paths

# The run folder's top-level folders (Stage.reads and Stage.writes name them).
METADATA = "metadata"
DOWNLOAD = "download"
RAW = "raw"
FACES = "faces"
SELECT = "select"
DEDUP = "dedup"
EMIT = "emit"
DATASET = "dataset"
AUDIT = "audit"


# The lease of the command writing a folder (engine.lease): a run folder or a publish target.
LEASE_FILE = "lease.json"


def raw_file_names(shard: str) -> tuple[str, str, str]:
    """img2dataset's three files of a raw shard, in the order they are published (stats last)."""
    return f"{shard}.tar", f"{shard}.parquet", f"{shard}_stats.json"


class RunLayout:
    """The path of every file and folder in the run folder at `url` (any fsspec URL)."""

    MARKERS = "_done"

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def path(self, *parts: str) -> str:
        return storage.join(self.url, *parts)

    def relative(self, url: str) -> str:
        """`url` relative to the run folder (unchanged when it lies outside)."""
        prefix = self.url + "/"
        return url[len(prefix) :] if url.startswith(prefix) else url

    # The driver's records and the markers

    @property
    def run_json(self) -> str:
        return self.path("run.json")

    @property
    def config_json(self) -> str:
        return self.path("config.json")

    @property
    def lease(self) -> str:
        return self.path(LEASE_FILE)

    def log(self, name: str) -> str:
        return self.path("logs", f"{name}.log")

    def markers(self, step: str) -> str:
        """The folder of a step's completion markers (`metadata/parts`, `faces`, ...)."""
        return self.path(step, self.MARKERS)

    def marker(self, step: str, shard: str) -> str:
        return storage.join(self.markers(step), f"{shard}.json")

    # metadata

    def metadata(self, *parts: str) -> str:
        return self.path(METADATA, *parts)

    @property
    def metadata_shards(self) -> str:
        return self.metadata("shards")

    def metadata_shard(self, shard: str) -> str:
        return self.metadata("shards", f"{shard}.parquet")

    def metadata_folder(self, kind: str) -> str:
        """kept, drops, urlhash (per parts task), dupes (per hash bucket), shards, lists."""
        return self.metadata(kind)

    def metadata_part(self, kind: str, part: str) -> str:
        """`kind` is kept, drops or urlhash; `part` a parts task id."""
        return self.metadata(kind, f"{part}.parquet")

    def metadata_dupes(self, bucket: str) -> str:
        return self.metadata("dupes", f"{bucket}.parquet")

    @property
    def metadata_duplicate_drops(self) -> str:
        """The duplicate_url counts per input file (beside the parts' drops)."""
        return self.metadata("drops", "duplicate_url.parquet")

    def metadata_list(self, name: str) -> str:
        """Where `metadata.<name>` (id_list, exclude_list) is saved for the workers (a base name:
        `.ids.npy` and `.urls.npy` are added)."""
        return self.metadata("lists", name)

    @property
    def metadata_inputs(self) -> str:
        return self.metadata("inputs.parquet")

    @property
    def metadata_summary(self) -> str:
        return self.metadata("summary.json")

    # download

    @property
    def raw(self) -> str:
        return self.path(RAW)

    def raw_tar(self, shard: str) -> str:
        return self.path(RAW, raw_file_names(shard)[0])

    def raw_parquet(self, shard: str) -> str:
        return self.path(RAW, raw_file_names(shard)[1])

    def raw_stats(self, shard: str) -> str:
        return self.path(RAW, raw_file_names(shard)[2])

    @property
    def retry_inputs(self) -> str:
        return self.path(DOWNLOAD, "retry")

    def retry_input(self, shard: str) -> str:
        return self.path(DOWNLOAD, "retry", f"{shard}.parquet")

    @property
    def download_pieces(self) -> str:
        """Parts of raw shards whose worker died, downloaded apart (stages.download.isolation)."""
        return self.path(DOWNLOAD, "pieces")

    # faces, select

    @property
    def faces_folder(self) -> str:
        return self.path(FACES)

    def faces(self, shard: str) -> str:
        return self.path(FACES, f"{shard}.parquet")

    @property
    def select_folder(self) -> str:
        return self.path(SELECT)

    def select(self, shard: str) -> str:
        return self.path(SELECT, f"{shard}.parquet")

    # dedup

    def dedup(self, *parts: str) -> str:
        return self.path(DEDUP, *parts)

    def dedup_samples(self, shard: str) -> str:
        return self.dedup("samples", f"{shard}.parquet")

    @property
    def dedup_decisions(self) -> str:
        return self.dedup("decisions.parquet")

    @property
    def dedup_drops(self) -> str:
        return self.dedup("drops.parquet")

    def dedup_folder(self, step: str) -> str:
        """samples, reference, bands or pairs: the files of one of dedup's steps."""
        return self.dedup(step)

    def dedup_reference(self, name: str) -> str:
        return self.dedup("reference", f"{name}.parquet")

    def dedup_bands(self, name: str) -> str:
        return self.dedup("bands", f"{name}.parquet")

    def dedup_pairs(self, partition: str) -> str:
        return self.dedup("pairs", f"{partition}.parquet")

    # emit and the dataset

    def emit_members(self, shard: str) -> str:
        return self.path(EMIT, "members", f"{shard}.parquet")

    @property
    def emit_pending(self) -> str:
        """dataset.json as emit leaves it, for the stage's finish to complete after the audit."""
        return self.path(EMIT, "dataset.json")

    @property
    def dataset(self) -> str:
        return self.path(DATASET)

    # audit

    @property
    def audit_funnel(self) -> str:
        return self.path(AUDIT, "funnel.parquet")

    @property
    def audit_shards(self) -> str:
        return self.path(AUDIT, "shards.parquet")

    @property
    def report(self) -> str:
        return self.path(AUDIT, "report.html")
