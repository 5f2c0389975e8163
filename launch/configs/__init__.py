"""Shipped run configs, package data `pipeline.run_configs`: `upcycle train --config NAME`."""
