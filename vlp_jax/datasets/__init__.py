"""Command-line tools that write datasets as ArrayRecord shards: convert.py (data on disk), emoji.py (emoji art)."""
