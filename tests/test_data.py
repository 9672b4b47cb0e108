import gzip
import json

import pytest

from metarlhf.data import Pair, Thumbs, load_records, make_task, read_prompts, split_users
from metarlhf.errors import DataError


def _write(path, lines):
    path.write_text("".join(lines))
    return path


def test_generic_jsonl_both_shapes(tmp_path):
    f = _write(
        tmp_path / "fb.jsonl",
        [
            json.dumps({"user_id": "a", "prompt": "p", "completion": "c", "label": 1}) + "\n",
            "\n",
            json.dumps({"user_id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}) + "\n",
        ],
    )
    recs, stats = load_records(f)
    assert recs == [Thumbs("a", "p", "c", 1), Pair("a", "p", "x", "y")]
    assert stats.skipped == 0


def test_persona_directory(tmp_path):
    lines = [
        {"question": "Q1", "statement": "S1", "answer_matching_behavior": " Yes"},
        {"question": "Q2", "statement": "S2", "answer_matching_behavior": " No"},
    ]
    with gzip.open(tmp_path / "stoic.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines))
    recs, _ = load_records(tmp_path)
    assert recs == [Thumbs("stoic", "Q1", "S1", 1), Thumbs("stoic", "Q2", "S2", 0)]


def test_malformed_line_names_file_and_line(tmp_path):
    f = _write(tmp_path / "bad.jsonl", ['{"user_id": "a", "prompt": "p", "completion": "c", "label": 1}\n', "{oops\n"])
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_records(f)
    recs, stats = load_records(f, skip_invalid=True)
    assert len(recs) == 1 and stats.skipped == 1


def test_bad_label_is_an_error(tmp_path):
    f = _write(tmp_path / "x.jsonl", [json.dumps({"user_id": "a", "prompt": "p", "completion": "c", "label": 7}) + "\n"])
    with pytest.raises(DataError, match="label"):
        load_records(f)


def test_make_task_is_balanced_and_reproducible():
    recs = [Thumbs("u", f"p{i}", f"c{i}", i % 2) for i in range(40)]
    t1 = make_task("u", recs, k=8, seed=3)
    t2 = make_task("u", recs, k=8, seed=3)
    assert t1.support == t2.support
    assert sum(r.label for r in t1.support) == 4
    assert not set(t1.support) & set(t1.query)
    assert len(t1.query) == 32
    with pytest.raises(DataError, match="only 40"):
        make_task("u", recs, k=40)
    with pytest.raises(DataError, match="no records"):
        make_task("u", [], k=4)


def test_split_users_is_deterministic():
    ids = [f"u{i}" for i in range(10)]
    a = split_users(ids, 3, seed=1)
    assert a == split_users(reversed(ids), 3, seed=1)
    assert len(a[1]) == 3 and not set(a[0]) & set(a[1])


def test_read_prompts_hh_format(tmp_path):
    dialog = "\n\nHuman: How do I bake bread?\n\nAssistant: Like this.\n\nHuman: more"
    with gzip.open(tmp_path / "hh.jsonl.gz", "wt") as f:
        f.write(json.dumps({"chosen": dialog, "rejected": dialog}) + "\n")
    assert read_prompts(tmp_path / "hh.jsonl.gz") == ["How do I bake bread?"]
    empty = _write(tmp_path / "e.jsonl", ["\n"])
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(empty)
