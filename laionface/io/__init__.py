"""Reading and writing: storage on any fsspec URL, tars, parquet schemas, image decoding."""
