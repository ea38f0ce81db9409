"""The KFP pipeline of one alignment round (see pipelines/README.md)."""
