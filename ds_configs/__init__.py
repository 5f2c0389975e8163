"""DeepSpeed config templates, shipped as package data `pipeline.ds_configs` (see pipeline/resources.py)."""
