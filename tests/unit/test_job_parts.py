"""A job's data in object storage (`perito_core.jobs.parts`): the inputs files and result parts
(JSON Lines, one item a line, in index order), the chunk slots the job store keeps, the
purge. A local folder (a real file system) stands for the bucket."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from perito.v1.vocabulary import ItemState
from perito_core.jobs.items import ItemInput, ItemResult
from perito_core.jobs.parts import (
    CANCELLED_MARK,
    FAILED_MARK,
    ChunkSlot,
    InputsWriter,
    JobData,
    JobDataMissing,
    LruCache,
    data_location,
    part_key,
)
from perito_core.quality import Quality, QualityMeasures
from perito_core.storage import LocalStore


def _data(root: Path) -> JobData:
    return JobData(str(root), LocalStore(root))


def _result(index: int) -> ItemResult:
    quality = Quality(QualityMeasures(812.3, 0.012, 0.004, 121.7, 48.2, 4032, 3024, 12.6), ())
    return ItemResult(
        index,
        ItemState.SUCCEEDED,
        id=f"IMG_{index}.jpg",
        uri=f"s3://photos/IMG_{index}.jpg",
        predictions=[("moderate", 1, 0.712345), ("minor", 0, 0.2)],
        margin=0.512345,
        normalized_entropy=0.6712,
        uncertain=True,
        form="openvino-int8",
        input_sha256="ab" * 32,
        quality=quality,
    )


def test_a_part_is_one_json_line_per_item_in_index_order_and_reads_back_the_same(
    tmp_path: Path,
) -> None:
    data = _data(tmp_path)
    failed = ItemResult(10, ItemState.FAILED, id="x", uri="s3://photos/x", error="NOT_FOUND: gone")
    results = [_result(8), _result(9), failed]
    data.write_part(4, 2, results)
    lines = (tmp_path / "parts" / "00000004-2.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [8, 9, 10]
    first = json.loads(lines[0])
    assert list(first)[:4] == ["index", "id", "uri", "state"]
    assert first["quality"]["width"] == 4032 and first["sha256"] == "ab" * 32
    assert "quality" not in json.loads(lines[2])  # an item not decoded has none
    assert data.read_part(4, 2, first=8, items=3) == results


def test_a_part_that_is_not_the_chunks_results_is_refused_never_read_as_them(
    tmp_path: Path,
) -> None:
    data = _data(tmp_path)
    data.write_part(0, 1, [_result(0), _result(1)])
    with pytest.raises(JobDataMissing, match="does not hold items 0 to 2"):
        data.read_part(0, 1, first=0, items=3)  # one item short
    with pytest.raises(JobDataMissing, match=r"parts/00000000-2.jsonl is missing"):
        data.read_part(0, 2, first=0, items=2)  # another attempt's part: never written
    (tmp_path / part_key(0, 3)).write_text('{"index": 0}\n')
    with pytest.raises(JobDataMissing, match="malformed"):
        data.read_part(0, 3, first=0, items=1)


@pytest.mark.parametrize(
    "line",
    [
        '{"index": 0}, {"index": 1}',  # two values on one line: read as one array, refused
        "[]",  # not an object
        '{"index": 0, "margin": NaN}',  # not JSON (RFC 8259), though Python would parse it
        '{"index": 0, "margin": -Infinity}',
        '{"index": 0',
    ],
)
def test_a_part_line_that_is_not_one_json_object_is_refused(tmp_path: Path, line: str) -> None:
    data = _data(tmp_path)
    good = _result(1).to_json()
    (tmp_path / "parts").mkdir()
    (tmp_path / part_key(0, 1)).write_text(f"{line}\n{good}\n")
    with pytest.raises(JobDataMissing, match="malformed"):
        data.read_part(0, 1, first=0, items=2)


def test_a_nan_never_reaches_a_part(tmp_path: Path) -> None:
    data = _data(tmp_path)
    slipped = ItemResult(0, ItemState.SUCCEEDED, predictions=[("a", 0, math.nan)])
    with pytest.raises(ValueError, match="JSON compliant"):
        data.write_part(0, 1, [slipped])
    assert not (tmp_path / "parts").exists()


def test_inputs_are_written_a_chunk_a_file_as_they_are_listed(tmp_path: Path) -> None:
    data = _data(tmp_path)
    items = [ItemInput(f"{n}", f"s3://photos/{n}.jpg") for n in range(10)]
    items[7] = ItemInput("7", "/data/link.jpg", error="PERMISSION_DENIED: out of the folder")
    with InputsWriter(data, chunk_size=4, threads=2) as writer:
        for item in items:
            writer.add(item)
        assert writer.close() == 3
    assert sorted(p.name for p in (tmp_path / "inputs").iterdir()) == [
        "00000000.jsonl",
        "00000001.jsonl",
        "00000002.jsonl",
    ]
    assert data.read_inputs(1, first=4, items=4) == items[4:8]
    assert data.read_inputs(2, first=8, items=2) == items[8:]
    with pytest.raises(JobDataMissing, match="holds 2 items; its chunk has 4"):
        data.read_inputs(2, first=8, items=4)


def test_chunk_slots_read_the_bitfield_the_scripts_write() -> None:
    # Chunk 0 recorded by attempt 2 with 3 failed; chunk 1 open; chunk 2 cancelled; chunk 3
    # failed whole; chunk 4 past the string's end (never written): open.
    raw = bytes([0, 2, 0, 3, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0, 0xFF, 0xFE, 0, 0])
    slots = ChunkSlot.parse(raw, 5)
    assert slots == [
        ChunkSlot(2, 3),
        ChunkSlot(),
        ChunkSlot(CANCELLED_MARK),
        ChunkSlot(FAILED_MARK),
        ChunkSlot(),
    ]
    counts = [
        {state: slot.count(state, 10) for state in ItemState if slot.count(state, 10)}
        for slot in slots
    ]
    assert counts == [
        {ItemState.SUCCEEDED: 7, ItemState.FAILED: 3},
        {ItemState.PENDING: 10},
        {ItemState.CANCELLED: 10},
        {ItemState.FAILED: 10},
        {ItemState.PENDING: 10},
    ]


def test_a_purge_is_bounded_per_call_and_leaves_no_folder_of_the_job(tmp_path: Path) -> None:
    root = Path(data_location(str(tmp_path), "acme", "job1")) / "sub1"
    data = _data(root)
    for chunk in range(5):
        data.write_inputs(chunk, [ItemInput("a")])
        data.write_part(chunk, 1, [ItemResult(chunk, ItemState.SUCCEEDED)])
    (root / "parts" / ".tmp-cut-short").write_bytes(b"half")  # a write that was killed
    assert data.purge(4) == (4, False)
    assert data.purge(100) == (7, True)
    assert not (tmp_path / "acme" / "job1").exists()  # the job's folder too
    assert (tmp_path / "acme").is_dir()  # the tenant's stays
    assert data.purge(100) == (0, True)  # nothing left: done


def test_the_cache_keeps_the_most_recently_used() -> None:
    cache = LruCache(2)
    made: list[str] = []

    def make(key: str) -> str:
        made.append(key)
        return key.upper()

    for key in ["a", "b", "a", "c", "a", "b"]:
        assert cache.get(key, lambda key=key: make(key)) == key.upper()  # type: ignore[misc]
    assert made == ["a", "b", "c", "b"]  # b was the least recently used when c came


def test_the_cache_is_bounded_by_weight_keeping_the_newest_whatever_it_weighs() -> None:
    cache = LruCache(10, weight=len)
    cache.get("small", lambda: [1] * 4)
    cache.get("medium", lambda: [2] * 6)
    cache.get("large", lambda: [3] * 12)  # over the bound alone: kept, the others dropped
    assert cache.get("large", lambda: []) == [3] * 12
    assert cache.get("small", lambda: ["again"]) == ["again"]
