"""Output paths are never clobbered, malformed adapter/store/data files give typed errors."""

import gzip
import json
import logging
import os
import stat

import pytest
import torch

from metarlhf.adapters import (
    CONFIG_FILE,
    META_FILE,
    Adapter,
    check_out,
    load_adapter,
    read_meta,
    save_adapter,
)
from metarlhf.data import load_records, read_prompts
from metarlhf.errors import AdapterError, ConfigError, DataError
from metarlhf.io import atomic_dir, atomic_write_json
from metarlhf.store import AdapterStore, check_id


def _adapter(value: float = 1.0, kind: str = "policy") -> Adapter:
    return Adapter(tensors={"base_model.model.layers.0.q_proj.lora_A.weight": torch.full((2, 4), value)},
                   config={"r": 2, "peft_type": "LORA"}, meta={"kind": kind, "base_model": "tiny"})


def _value(path) -> float:
    return float(next(iter(load_adapter(path).tensors.values()))[0, 0])


# -- 1: save_adapter / atomic_dir never replace what the project did not write ---------------


def test_save_adapter_refuses_a_directory_of_user_files_and_leaves_it_alone(tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="refusing to replace"):
        check_out(thesis)
    with pytest.raises(ConfigError, match="refusing to replace"):
        save_adapter(thesis, _adapter())
    assert (thesis / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]  # no temp or .old left


def test_save_adapter_refuses_an_adapter_directory_with_extra_files(tmp_path):
    save_adapter(tmp_path / "a", _adapter(1.0))
    (tmp_path / "a" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="refusing to replace"):
        save_adapter(tmp_path / "a", _adapter(2.0))
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine" and _value(tmp_path / "a") == 1.0


def test_save_adapter_refuses_a_file_and_a_path_inside_a_file(tmp_path):
    data = tmp_path / "fb.jsonl"
    data.write_text("{}\n")
    with pytest.raises(ConfigError, match="is a file"):
        save_adapter(data, _adapter())
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        save_adapter(data / "sub", _adapter())
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_out(data / "sub")
    assert data.read_text() == "{}\n"


def test_save_adapter_replaces_an_older_adapter_and_a_reward_init(tmp_path):
    save_adapter(tmp_path / "a", _adapter(1.0))
    check_out(tmp_path / "a")
    save_adapter(tmp_path / "a", _adapter(2.0))
    assert _value(tmp_path / "a") == 2.0
    extra = {"split.json": b"{}\n", "metrics.jsonl": b""}
    save_adapter(tmp_path / "init", _adapter(1.0, "reward_init"), extra_files=extra)
    save_adapter(tmp_path / "init", _adapter(3.0, "reward_init"), extra_files=extra)
    assert _value(tmp_path / "init") == 3.0
    (tmp_path / "empty").mkdir()  # an empty directory holds nothing to lose
    save_adapter(tmp_path / "empty", _adapter(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty", "init"]


def test_atomic_write_to_a_directory_or_inside_a_file_is_a_config_error(tmp_path):
    (tmp_path / "out.json").mkdir()
    (tmp_path / "out.json" / "keep").write_text("x")
    with pytest.raises(ConfigError, match="a directory of that name exists"):
        atomic_write_json(tmp_path / "out.json", {"a": 1})
    assert (tmp_path / "out.json" / "keep").read_text() == "x"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        atomic_write_json(tmp_path / "afile" / "sub" / "out.json", {"a": 1})


def test_a_replace_interrupted_between_its_renames_is_undone(tmp_path):
    old = tmp_path / ".out.old"  # a crash left the previous contents aside and no "out"
    old.mkdir()
    (old / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="refusing to replace"), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new.bin").write_bytes(b"1")
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_stale_aside_adapter_is_restored_then_replaced(tmp_path):
    save_adapter(tmp_path / "a", _adapter(1.0))
    os.replace(tmp_path / "a", tmp_path / ".a.old")
    save_adapter(tmp_path / "a", _adapter(2.0))
    assert _value(tmp_path / "a") == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    save_adapter(tmp_path / ".a.old", _adapter(1.0))  # a leftover after a completed swap
    save_adapter(tmp_path / "a", _adapter(3.0))
    assert _value(tmp_path / "a") == 3.0 and sorted(p.name for p in tmp_path.iterdir()) == ["a"]


# -- 8: permissions follow the umask; an adapter without sha256 is refused -------------------


def test_written_files_and_adapter_dirs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_adapter(tmp_path / "a", _adapter())
        atomic_write_json(tmp_path / "x.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a").iterdir()} == {0o644}
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644


def test_an_adapter_without_a_sha256_is_refused(tmp_path):
    save_adapter(tmp_path / "a", _adapter())
    meta = read_meta(tmp_path / "a")
    del meta["sha256"]
    (tmp_path / "a" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="no sha256"):
        load_adapter(tmp_path / "a")
    assert load_adapter(tmp_path / "a", verify=False).rank == 2


# -- 4: malformed adapter and store files are AdapterErrors ----------------------------------


@pytest.mark.parametrize("name", [META_FILE, CONFIG_FILE])
@pytest.mark.parametrize("content", [b"[1, 2]", b'"text"', b"\xff\xfe{}", b"[" * 100000])
def test_malformed_adapter_json_is_an_adapter_error_naming_the_file(tmp_path, name, content):
    save_adapter(tmp_path / "a", _adapter())
    (tmp_path / "a" / name).write_bytes(content)
    with pytest.raises(AdapterError, match=name):
        load_adapter(tmp_path / "a")


def test_resolve_falls_back_past_a_version_with_broken_metadata(tmp_path):
    s = AdapterStore(tmp_path, keep=5)
    s.save("t", "u", "policy", _adapter(1.0))
    v2 = s.save("t", "u", "policy", _adapter(2.0))
    (v2.path / META_FILE).write_text("[]")
    assert s.resolve("t", "u", "policy").version == 1
    assert "error" in s.describe("t", "u", "policy")["versions"][1]
    (v2.path / META_FILE).write_bytes(b"\xff")
    assert s.resolve("t", "u", "policy").version == 1


def test_current_with_bad_utf8_falls_back_and_a_directory_is_an_adapter_error(tmp_path, caplog):
    s = AdapterStore(tmp_path, keep=5)
    s.save("t", "u", "policy", _adapter(1.0))
    s.save("t", "u", "policy", _adapter(2.0))
    cur = tmp_path / "users/t/u/policy/CURRENT"
    cur.write_bytes(b"v\xff1\n")
    with caplog.at_level(logging.ERROR, logger="metarlhf.store"):
        assert s.current("t", "u", "policy") == 2
    assert "unreadable CURRENT" in caplog.text
    cur.unlink()
    cur.mkdir()
    with pytest.raises(AdapterError, match="CURRENT"):
        s.resolve("t", "u", "policy")


# -- 2: ids never start with a dot; tombstones and temp names are never users ----------------


@pytest.mark.parametrize("bad", [".bob.deleted", ".hidden", ".", "..", "bob~deleted", "alice\n", "", "a" * 129])
def test_ids_cannot_start_with_a_dot_or_be_store_names(bad):
    with pytest.raises(ConfigError):
        check_id(bad)


@pytest.mark.parametrize("good", ["_bob", "-x", "bob.deleted", "a" * 128, "9"])
def test_ids_accepted_before_stay_valid(good):  # no stored user of the old rule is stranded (but dotted ones)
    assert check_id(good) == good


def test_delete_user_leaves_other_users_and_users_lists_only_real_ones(tmp_path):
    s = AdapterStore(tmp_path)
    s.save("t", "bob", "policy", _adapter(1.0))
    s.save("t", "bob.deleted", "policy", _adapter(2.0))
    for junk in (".bob.deleted", ".x.tmp", "carol~deleted"):
        (tmp_path / "users" / "t" / junk).mkdir()
    assert s.users() == [("t", "bob"), ("t", "bob.deleted")]
    assert s.delete_user("t", "bob")
    assert s.users("t") == [("t", "bob.deleted")]
    assert s.resolve("t", "bob.deleted", "policy").version == 1


# -- 3, 5, 6, 7: data files ------------------------------------------------------------------


def _rec(user="a", prompt="p", label=1) -> str:
    return json.dumps({"user_id": user, "prompt": prompt, "completion": "c", "label": label}) + "\n"


def test_a_corrupted_gzip_is_a_data_error_naming_the_file(tmp_path):
    blob = bytearray(gzip.compress("".join(_rec(prompt=f"prompt {i} " * 20) for i in range(200)).encode()))
    for i in range(20, len(blob) - 20, 7):
        blob[i] ^= 0x5A
    f = tmp_path / "fb.jsonl.gz"
    f.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="fb.jsonl.gz: cannot read"):
        load_records(f)


def test_a_lone_surrogate_is_refused_with_file_and_line(tmp_path):
    f = tmp_path / "fb.jsonl"
    f.write_text(_rec() + '{"user_id": "a", "prompt": "\\ud800", "completion": "c", "label": 1}\n' + _rec())
    with pytest.raises(DataError, match=r"fb.jsonl:2: .*surrogate"):
        load_records(f)
    recs, stats = load_records(f, skip_invalid=True)
    assert len(recs) == 2 and stats.skipped == 1
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": "x\\udc00"}\n')
    with pytest.raises(DataError, match="prompts.jsonl:2:"):
        read_prompts(p)


def test_a_user_in_both_jsonl_and_gz_is_refused(tmp_path):
    (tmp_path / "u.jsonl").write_text(_rec(user="u"))
    (tmp_path / "u.jsonl.gz").write_bytes(gzip.compress(_rec(user="u").encode()))
    with pytest.raises(DataError, match=r"u\.jsonl and .*u\.jsonl\.gz"):
        load_records(tmp_path)


def test_an_empty_per_user_file_is_never_silent(tmp_path, caplog):
    (tmp_path / "a.jsonl").write_text(_rec(user="a"))
    (tmp_path / "b.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"b\.jsonl: empty"):
        load_records(tmp_path)
    with caplog.at_level(logging.WARNING, logger="metarlhf.data"):
        recs, stats = load_records(tmp_path, skip_invalid=True)
    assert len(recs) == 1 and stats.skipped == 1 and "b.jsonl: empty" in caplog.text


def test_bad_utf8_names_its_line_and_skip_invalid_skips_only_that_line(tmp_path):
    f = tmp_path / "fb.jsonl"
    f.write_bytes(_rec(prompt="one").encode() + b'{"user_id": "a", "prompt": "\xff"}\n' + _rec(prompt="three").encode())
    with pytest.raises(DataError, match=r"fb.jsonl:2: invalid UTF-8 at byte 28"):
        load_records(f)
    recs, stats = load_records(f, skip_invalid=True)
    assert [r.prompt for r in recs] == ["one", "three"] and stats.skipped == 1
    p = tmp_path / "prompts.txt"
    p.write_bytes(b"ok\n\xff\n")
    with pytest.raises(DataError, match="prompts.txt:2: invalid UTF-8"):
        read_prompts(p)


def test_deeply_nested_json_is_a_malformed_line(tmp_path):
    f = tmp_path / "fb.jsonl"
    f.write_text(_rec() + "[" * 100000 + "\n")
    with pytest.raises(DataError, match="fb.jsonl:2: JSON nested too deeply"):
        load_records(f)
    recs, stats = load_records(f, skip_invalid=True)
    assert len(recs) == 1 and stats.skipped == 1


# -- eval --out: only an earlier result of the same command is replaced ---------------------


def test_check_results_out_replaces_only_earlier_results(tmp_path):
    from metarlhf.io import check_results_out

    earlier = tmp_path / "r.json"
    atomic_write_json(earlier, {"methods": {}, "users": 3})
    check_results_out(earlier, ("methods", "users"), "a result", {tmp_path / "missing.json": ("x",)})  # accepted
    other = tmp_path / "other.json"
    atomic_write_json(other, {"methods": {}})
    text = tmp_path / "notes.txt"
    text.write_text("my notes\n")
    for out, keys in [(other, ("methods", "users")), (text, ("methods",)), (tmp_path, ("methods",))]:
        with pytest.raises(ConfigError, match="refusing to replace"):
            check_results_out(out, keys, "a result")
    fake_png = tmp_path / "r.png"  # the plot's name next to r.json
    fake_png.write_text("not a picture")
    with pytest.raises(ConfigError, match="refusing to replace"):
        check_results_out(earlier, ("methods", "users"), "a result")
    assert text.read_text() == "my notes\n" and fake_png.read_text() == "not a picture"


@pytest.mark.parametrize("kind", ["reward", "policy"])
def test_eval_out_naming_the_input_data_is_refused_and_left_alone(tmp_path, kind, capsys):
    from metarlhf.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"user_id": "u", "prompt": "p", "completion": "c", "label": 1}) + "\n")
    before = data.read_bytes()
    if kind == "reward":
        argv = ["eval", "reward", "--data", str(data), "--holdout", "1", "--k", "1", "--out", str(data)]
    else:
        argv = ["eval", "policy", "--prompts", str(data), "--k", "2", "--out", str(data)]
    assert main(argv) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert data.read_bytes() == before
    png = tmp_path / "res.png"
    png.write_text("a file that only looks like the plot's name")
    argv[-1] = str(tmp_path / "res.json")
    assert main(argv) == 2 and png.read_text() == "a file that only looks like the plot's name"
