from laionface.cli import entry

entry()
