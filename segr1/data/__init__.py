"""Datasets as Parquet shards: the record schema, writing, preparing, synthesising and reading.

Pure data code: imports pyarrow, numpy and Pillow only (no torch, Ray, vLLM or DeepSpeed).
"""

from __future__ import annotations

from segr1.data.cli import main
from segr1.data.layouts import PairSource, parse_layout_spec, parse_pair_spec, resolve_layout
from segr1.data.prepare import PrepareReport, prepare_dataset
from segr1.data.reader import ShardReader
from segr1.data.records import (
    SCHEMA,
    SCHEMA_VERSION,
    TASKS,
    DatasetError,
    Record,
    decode_record,
    encode_record,
)
from segr1.data.shards import MANIFEST_NAME, ShardWriter, read_manifest
from segr1.data.synth import make_scene, synth_record, synth_records, write_synth

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA",
    "SCHEMA_VERSION",
    "TASKS",
    "DatasetError",
    "PairSource",
    "PrepareReport",
    "Record",
    "ShardReader",
    "ShardWriter",
    "decode_record",
    "encode_record",
    "main",
    "make_scene",
    "parse_layout_spec",
    "parse_pair_spec",
    "prepare_dataset",
    "read_manifest",
    "resolve_layout",
    "synth_record",
    "synth_records",
    "write_synth",
]
