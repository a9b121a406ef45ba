"""Corpus files: reading the input formats, shard boundaries, shard I/O, assembly.

The input (JSONL, CSV, Parquet or plain text) is read once, streaming, and
rewritten as normalised JSONL lines `{"id": ..., "text": ...}`; shards are
byte ranges of that file. Everything here holds at most one shard in memory,
whatever the corpus size, and every file is written beside its final name and
renamed when complete, so a crash never leaves a half-written shard that looks
finished.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import InvalidRequest
from app.jobs.files import fsync_replace
from app.jobs.lines import LineTooLong, bounded_lines

INPUT_FORMATS = ("jsonl", "csv", "parquet", "text")
OUTPUT_FORMATS = ("jsonl", "parquet", "npy")


def input_format_of(filename: str) -> str:
    name = filename.lower()
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


#: The most a Parquet column chunk may unpack to: a small file whose pages or
#: dictionary decompress to gigabytes is refused before it is read.
MAX_PARQUET_CHUNK_BYTES = 1024**3


def _lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    with path.open("rb") as handle:
        for number, raw in bounded_lines(handle, max_line_bytes):
            if isinstance(raw, LineTooLong):
                raise InvalidRequest(
                    f"line {number} is {raw.size} bytes; at most {max_line_bytes}",
                    code="line_too_long",
                )
            yield number, raw.decode("utf-8")


def _records(path: Path, fmt: str, max_line_bytes: int) -> Iterator[dict[str, Any] | str]:
    if fmt == "text":
        for _, line in _lines(path, max_line_bytes):
            text = line.rstrip("\r\n")
            if text.strip():
                yield text
    elif fmt == "jsonl":
        for number, line in _lines(path, max_line_bytes):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                raise InvalidRequest(f"line {number} is not valid JSON") from None
            yield record
    elif fmt == "csv":
        if csv.field_size_limit() < max_line_bytes:
            csv.field_size_limit(max_line_bytes)
        yield from csv.DictReader(line for _, line in _lines(path, max_line_bytes))
    elif fmt == "parquet":
        yield from _parquet_records(path, max_line_bytes)
    else:
        raise InvalidRequest(f"unknown input format {fmt!r}")


def _parquet_records(path: Path, max_value_bytes: int) -> Iterator[dict[str, Any]]:
    """Rows one at a time. String columns are read as dictionaries, so a value that
    many rows repeat is unpacked once, and each value is checked before it is made
    into a Python string."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    meta = parquet.metadata
    for group in range(meta.num_row_groups):
        for column in range(meta.num_columns):
            size = meta.row_group(group).column(column).total_uncompressed_size
            if size > MAX_PARQUET_CHUNK_BYTES:
                raise InvalidRequest(
                    f"a Parquet column chunk unpacks to {size} bytes; "
                    f"at most {MAX_PARQUET_CHUNK_BYTES}"
                )
    strings = [
        f.name
        for f in parquet.schema_arrow
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
    ]
    parquet = pq.ParquetFile(path, read_dictionary=strings)
    for batch in parquet.iter_batches(batch_size=1024):
        columns = {name: batch.column(name) for name in batch.schema.names}
        for name, values in columns.items():
            if pa.types.is_dictionary(values.type):
                longest = pc.max(pc.binary_length(values.dictionary)).as_py()
                if longest is not None and longest > max_value_bytes:
                    raise InvalidRequest(
                        f"a value of column {name!r} is {longest} bytes; at most {max_value_bytes}"
                    )
        for row in range(batch.num_rows):
            yield {name: values[row].as_py() for name, values in columns.items()}


def _text_and_id(
    record: dict[str, Any] | str, index: int, text_field: str | None, id_field: str | None
) -> tuple[str, str]:
    if isinstance(record, str):
        return record, str(index)
    if not isinstance(record, dict):
        raise InvalidRequest(f"record {index} is not an object")
    field = text_field or "text"
    text = record.get(field)
    if not isinstance(text, str) or not text:
        raise InvalidRequest(
            f"record {index} has no text in field {field!r}; set text_field", param="text_field"
        )
    if id_field:
        if record.get(id_field) is None:
            raise InvalidRequest(f"record {index} has no {id_field!r}", param="id_field")
        return text, str(record[id_field])
    return text, str(index)


@dataclass(frozen=True)
class Shard:
    index: int
    first: int  # index of its first text in the corpus
    count: int
    start: int  # byte range in the normalised file
    end: int


def normalise(
    source: Path,
    fmt: str,
    target: Path,
    shard_size: int,
    text_field: str | None,
    id_field: str | None,
    max_line_bytes: int = 16 * 1024**2,
) -> Iterator[Shard]:
    """Rewrite `source` as normalised JSONL at `target`, yielding shards as they close."""
    tmp = target.with_suffix(".part")
    index = shard_first = shard_start = 0
    shard_number = 0
    try:
        with tmp.open("wb") as out:
            for record in _records(source, fmt, max_line_bytes):
                text, ident = _text_and_id(record, index, text_field, id_field)
                out.write(json.dumps({"id": ident, "text": text}, ensure_ascii=False).encode())
                out.write(b"\n")
                index += 1
                if index - shard_first == shard_size:
                    end = out.tell()
                    yield Shard(shard_number, shard_first, shard_size, shard_start, end)
                    shard_number, shard_first, shard_start = shard_number + 1, index, end
            if index > shard_first:
                yield Shard(shard_number, shard_first, index - shard_first, shard_start, out.tell())
        if index == 0:
            raise InvalidRequest("the file holds no texts", param="file_id")
        fsync_replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_shard(path: Path, start: int, end: int) -> tuple[list[str], list[str]]:
    with path.open("rb") as handle:
        handle.seek(start)
        data = handle.read(end - start)
    ids: list[str] = []
    texts: list[str] = []
    for line in io.BytesIO(data):
        record = json.loads(line)
        ids.append(record["id"])
        texts.append(record["text"])
    return ids, texts


def shard_paths(directory: Path, index: int) -> tuple[Path, Path]:
    return directory / f"shard-{index:06d}.npy", directory / f"shard-{index:06d}.ids.json"


def write_shard(directory: Path, index: int, ids: list[str], vectors: np.ndarray) -> None:
    vectors_path, ids_path = shard_paths(directory, index)
    tmp_ids = ids_path.with_suffix(".part")
    tmp_ids.write_text(json.dumps(ids))
    fsync_replace(tmp_ids, ids_path)
    tmp_vectors = vectors_path.with_suffix(".part")
    with tmp_vectors.open("wb") as handle:
        np.save(handle, vectors.astype(np.float32, copy=False))
    fsync_replace(tmp_vectors, vectors_path)


def load_shard(directory: Path, index: int) -> tuple[list[str], np.ndarray]:
    vectors_path, ids_path = shard_paths(directory, index)
    return json.loads(ids_path.read_text()), np.load(vectors_path)


def assemble(directory: Path, shards: int, total: int, fmt: str, out: Path) -> Path | None:
    """Join shards in input order into `out`; returns the ids file for npy, else None."""
    tmp = out.with_suffix(".part")
    ids_out: Path | None = None
    if fmt == "jsonl":
        with tmp.open("w", encoding="utf-8") as handle:
            for index in range(shards):
                ids, vectors = load_shard(directory, index)
                for ident, row in zip(ids, vectors, strict=True):
                    line = {"id": ident, "embedding": [float(x) for x in row]}
                    handle.write(json.dumps(line) + "\n")
    elif fmt == "npy":
        _, first = load_shard(directory, 0)
        matrix = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.float32, shape=(total, first.shape[1])
        )
        ids_out = out.with_name(out.name + ".ids.jsonl")
        ids_tmp = ids_out.with_suffix(".part")
        row = 0
        with ids_tmp.open("w", encoding="utf-8") as id_handle:
            for index in range(shards):
                ids, vectors = load_shard(directory, index)
                matrix[row : row + len(ids)] = vectors
                row += len(ids)
                for ident in ids:
                    id_handle.write(json.dumps(ident) + "\n")
        matrix.flush()
        del matrix
        fsync_replace(ids_tmp, ids_out)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer: pq.ParquetWriter | None = None
        try:
            for index in range(shards):
                ids, vectors = load_shard(directory, index)
                dim = vectors.shape[1]
                embedding = pa.FixedSizeListArray.from_arrays(
                    pa.array(vectors.reshape(-1), type=pa.float32()), dim
                )
                table = pa.table({"id": pa.array(ids, pa.string()), "embedding": embedding})
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
    else:
        raise InvalidRequest(f"unknown output format {fmt!r}", param="output_format")
    fsync_replace(tmp, out)
    return ids_out
