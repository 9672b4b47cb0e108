"""Feedback records, readers and per-user few-shot tasks.

Two record types:

* :class:`Thumbs` -- ``user_id, prompt, completion, label`` (1 = up, 0 = down)
* :class:`Pair`   -- ``user_id, prompt, chosen, rejected``

Readers:

* generic JSONL, one record per line, either shape;
* a directory of per-user files in the Anthropic persona format
  (``<user>.jsonl`` or ``<user>.jsonl.gz``): ``question`` is the prompt, ``statement``
  the completion, ``answer_matching_behavior == " Yes"`` is thumbs up, ``" No"`` down.

Malformed input raises :class:`~metarlhf.errors.DataError` naming the file and line,
or, with ``skip_invalid=True``, is skipped and counted (and logged as a warning). A
malformed line is one that is not UTF-8, not JSON (or nested too deeply), not a record,
or holds text that cannot be encoded (a lone surrogate escape such as ``"\\ud800"``).
In a directory, an empty per-user file counts as malformed too, and a user with both
``u.jsonl`` and ``u.jsonl.gz`` is refused (``gzip -k`` leaves both behind).
A file that cannot be read at all (I/O error, corrupted gzip) is always a DataError.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from metarlhf.errors import DataError, check_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thumbs:
    user_id: str
    prompt: str
    completion: str
    label: int  # 1 = thumbs up, 0 = thumbs down


@dataclass(frozen=True)
class Pair:
    user_id: str
    prompt: str
    chosen: str
    rejected: str


Record = Thumbs | Pair


@dataclass
class ReadStats:
    """What a reader saw: records kept and lines skipped (only with skip_invalid)."""

    records: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


def _label(value: object) -> int:
    if value in (1, True, "up", "1", 1.0):
        return 1
    if value in (0, False, "down", "0", 0.0):
        return 0
    raise ValueError(f"label must be 1/0 or 'up'/'down', got {value!r}")


def _str_field(obj: dict, key: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise ValueError(f"field {key!r} must be a string, got {type(v).__name__}")
    return check_text(v, f"field {key!r}", ValueError)  # the reader adds file:line


def parse_record(obj: object, default_user: str | None = None) -> Record:
    """Turn one JSON object into a record. Raises ``ValueError`` on a bad shape."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    user = obj.get("user_id", default_user)
    if not isinstance(user, str) or not user:
        raise ValueError("field 'user_id' must be a non-empty string")
    check_text(user, "field 'user_id'", ValueError)
    if "chosen" in obj or "rejected" in obj:
        pair = Pair(user, _str_field(obj, "prompt"), _str_field(obj, "chosen"), _str_field(obj, "rejected"))
        if pair.chosen == pair.rejected:  # no preference to learn: its loss is log 2 whatever the model
            raise ValueError("'chosen' and 'rejected' are the same text")
        return pair
    if "completion" in obj:
        if "label" not in obj:
            raise ValueError("thumbs record needs a 'label'")
        return Thumbs(user, _str_field(obj, "prompt"), _str_field(obj, "completion"), _label(obj["label"]))
    if "statement" in obj:  # persona format
        ans = obj.get("answer_matching_behavior")
        if ans not in (" Yes", " No", "Yes", "No"):
            raise ValueError(f"'answer_matching_behavior' must be ' Yes' or ' No', got {ans!r}")
        return Thumbs(user, _str_field(obj, "question"), _str_field(obj, "statement"), int(ans.strip() == "Yes"))
    raise ValueError("not a thumbs, pair or persona record (need completion+label, chosen+rejected, or statement)")


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, bytes)`` of a plain or gzipped file; DataError if it cannot be read.

    Lines are decoded by the caller, one at a time, so that bad UTF-8 names its line.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                yield lineno, line
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        where = f" after line {lineno}" if lineno else ""
        raise DataError(f"{path}: cannot read{where}: {e}") from e


def _decode(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 at byte {e.start} of the line") from None


def _loads(text: str) -> object:
    """``json.loads``, with too-deep nesting reported as the ValueError it is."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_jsonl(
    path: str | Path, default_user: str | None = None, skip_invalid: bool = False, stats: ReadStats | None = None
) -> list[Record]:
    """Read one JSONL file of records."""
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    out: list[Record] = []
    for lineno, raw in _raw_lines(path):
        if not raw.strip():
            continue
        try:
            out.append(parse_record(_loads(_decode(raw)), default_user))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            _malformed(f"{path}:{lineno}: {e}", skip_invalid, stats, e)
    stats.records += len(out)
    return out


def _malformed(msg: str, skip_invalid: bool, stats: ReadStats, cause: Exception | None = None) -> None:
    """Raise DataError(msg), or with ``skip_invalid`` count it as skipped."""
    if not skip_invalid:
        raise DataError(msg) from cause
    stats.skipped += 1
    stats.errors.append(msg)


def _user_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
    if not files:
        raise DataError(f"{directory}: no *.jsonl or *.jsonl.gz files")
    seen: dict[str, Path] = {}
    for f in files:
        user = user_id_from_path(f)
        if user in seen:  # e.g. left behind by `gzip -k`: reading both would count the user twice
            raise DataError(f"{seen[user]} and {f} both hold user {user!r}; remove one of them")
        seen[user] = f
    return files


def user_id_from_path(path: Path) -> str:
    name = path.name
    for suffix in (".jsonl.gz", ".jsonl"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_records(path: str | Path, skip_invalid: bool = False) -> tuple[list[Record], ReadStats]:
    """Read a JSONL file, or a directory of per-user files (persona format or generic).

    In a directory, a line without ``user_id`` belongs to the user named by its file.
    """
    path = Path(path)
    stats = ReadStats()
    if path.is_dir():
        records: list[Record] = []
        for f in _user_files(path):
            before = stats.skipped
            got = read_jsonl(f, default_user=user_id_from_path(f), skip_invalid=skip_invalid, stats=stats)
            if not got and stats.skipped == before:
                _malformed(f"{f}: empty file (no records)", skip_invalid, stats)
            records += got
    elif path.is_file():
        records = read_jsonl(path, skip_invalid=skip_invalid, stats=stats)
    else:
        raise DataError(f"{path}: no such file or directory")
    if stats.skipped:
        log.warning("skipped %d malformed line(s) in %s; first: %s", stats.skipped, path, stats.errors[0])
    if not records:
        raise DataError(f"{path}: no valid records")
    return records, stats


def group_by_user(records: Iterable[Record]) -> dict[str, list[Record]]:
    users: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        users[r.user_id].append(r)
    return dict(users)


@dataclass
class UserTask:
    """One user's few-shot problem: K support records to adapt on, the rest to evaluate."""

    user_id: str
    support: list[Record]
    query: list[Record]


def make_task(
    user_id: str, records: list[Record], k: int, seed: int = 0, max_query: int | None = None, balanced: bool = True
) -> UserTask:
    """Split one user's records into K support and a query set, reproducibly.

    With ``balanced`` and thumbs data, the support set takes ``ceil(K/2)`` ups and
    ``floor(K/2)`` downs where the user has them (as an app would after a few of each).
    """
    if not records:
        raise DataError(f"user {user_id!r} has no records")
    if k < 1:
        raise DataError(f"K must be >= 1, got {k}")
    if k >= len(records):
        raise DataError(f"K={k} but user {user_id!r} has only {len(records)} records (need K+1 for a query set)")
    rng = random.Random(f"{user_id}:{seed}")
    order = list(range(len(records)))
    rng.shuffle(order)
    support_idx: list[int] = []
    if balanced and all(isinstance(r, Thumbs) for r in records):
        ups = [i for i in order if records[i].label == 1]
        downs = [i for i in order if records[i].label == 0]
        n_up = min(len(ups), (k + 1) // 2)
        n_down = min(len(downs), k - n_up)
        n_up = k - n_down if len(ups) >= k - n_down else n_up
        support_idx = ups[:n_up] + downs[:n_down]
        rng.shuffle(support_idx)
    else:
        support_idx = order[:k]
    chosen = set(support_idx)
    query = [records[i] for i in order if i not in chosen]
    if max_query is not None:
        query = query[:max_query]
    return UserTask(user_id, [records[i] for i in support_idx], query)


def user_support(path: str | Path, user_id: str, k: int, seed: int = 0, skip_invalid: bool = False) -> list[Record]:
    """K support records of one user from a data file or directory (all of them if K = their count).

    Raises :class:`DataError` if the user has no records or fewer than K. With
    ``skip_invalid`` malformed lines are skipped and counted (a warning) instead of an
    error (see :func:`load_records`).
    """
    records, _ = load_records(path, skip_invalid=skip_invalid)
    recs = group_by_user(records).get(user_id)
    if not recs:
        raise DataError(f"user {user_id!r} has no records in {path}")
    if k < 1 or k > len(recs):
        raise DataError(f"K={k} but user {user_id!r} has only {len(recs)} records")
    return recs if k == len(recs) else make_task(user_id, recs, k, seed=seed).support


def split_users(user_ids: Iterable[str], holdout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministically hold out ``holdout`` whole users: ``(train_ids, heldout_ids)``."""
    ids = sorted(user_ids)
    if holdout < 0 or holdout >= len(ids):
        raise DataError(f"cannot hold out {holdout} of {len(ids)} users")
    rng = random.Random(seed)
    held = sorted(rng.sample(ids, holdout))
    return [u for u in ids if u not in set(held)], held


def prompts_after(path: str | Path, offset: int, n: int) -> list[str]:
    """Up to ``n`` prompts of ``path`` from index ``offset`` on, leaving out any whose text is
    among the first ``offset`` (the ones meta-training and the pilots draw from) or repeats an
    earlier one: prompts held out for evaluation are never prompts seen before the offset.
    (In the HH-RLHF test file, prompts 1034 and 1035 repeat earlier ones.)"""
    limit = offset + n
    while True:
        every = read_prompts(path, limit=limit)
        seen, out = set(every[:offset]), []
        for prompt in every[offset:]:
            if prompt not in seen:
                seen.add(prompt)
                out.append(prompt)
                if len(out) == n:
                    return out
        if len(every) < limit:  # the file has no more
            return out
        limit += max(n, 64)


def text_digest(texts: Iterable[str]) -> str:
    """sha256 (hex) of a sequence of texts, order included: two runs that read the same
    prompts (or records) in the same order have the same digest, whatever file they came from."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def prompt_digests(prompts: Iterable[str]) -> list[str]:
    """A short digest (16 hex digits of sha256) per distinct prompt, sorted: what a policy
    init records of the prompts it was meta-trained on, so an evaluation can tell whether
    its held-out prompts are among them without the prompts themselves."""
    return sorted({hashlib.sha256(p.encode("utf-8", "surrogatepass")).hexdigest()[:16] for p in prompts})


def records_digest(records: Iterable[Record]) -> str:
    """:func:`text_digest` of ``records`` (their fields, in order): a resumed meta-training
    run checks with it that it reads the data its checkpoint was trained on."""
    fields: list[str] = []
    for r in records:
        if isinstance(r, Thumbs):
            fields += ["t", r.user_id, r.prompt, r.completion, str(r.label)]
        else:
            fields += ["p", r.user_id, r.prompt, r.chosen, r.rejected]
    return text_digest(fields)


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts from HH-RLHF dialogues (first ``Human:`` turn) or JSONL ``{"prompt": ...}``.

    Accepts ``.jsonl`` / ``.jsonl.gz`` whose lines carry ``prompt``, ``question`` or
    ``chosen`` (an HH-RLHF dialogue), or a plain text file with one prompt per line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    prompts: list[str] = []
    is_jsonl = path.name.endswith((".jsonl", ".jsonl.gz", ".json"))
    for lineno, raw in _raw_lines(path):
        try:
            line = _decode(raw).strip()
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from e
        if not line:
            continue
        if not is_jsonl:
            prompts.append(line)  # strictly decoded UTF-8: no lone surrogates
        else:
            try:
                obj = _loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e}") from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            text = obj.get("prompt") or obj.get("question")
            if text is None and isinstance(obj.get("chosen"), str):
                text = first_human_turn(obj["chosen"])
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{lineno}: no 'prompt', 'question' or HH-RLHF 'chosen' dialogue")
            prompts.append(_text_at(text.strip(), path, lineno))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def _text_at(text: str, path: Path, lineno: int) -> str:
    try:
        return check_text(text, "the prompt", ValueError)
    except ValueError as e:
        raise DataError(f"{path}:{lineno}: {e}") from e


def first_human_turn(dialogue: str) -> str:
    """The first ``Human:`` turn of an HH-RLHF dialogue."""
    text = dialogue.split("\n\nHuman:", 1)[-1]
    return text.split("\n\nAssistant:", 1)[0].strip()
