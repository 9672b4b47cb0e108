"""Simulated users: programmatic true rewards over text, and the feedback they give.

A :class:`SimUser` has a name, a *family* (length, format, tone, content, vocabulary)
and a true reward ``f(prompt, completion) -> float``. It gives feedback the way an app
user would:

* **thumbs** on a group of completions for the same prompt: the ones above the group's
  median reward get a thumbs up, the others a thumbs down (a user judges what they see
  side by side). If every completion in a group scores the same, the user falls back
  to an absolute bar (``threshold``). Optional label noise flips each label with
  probability ``noise``.
* **pairs**: the higher-reward completion is chosen (ties are broken at random), with
  the same optional flip noise.

The library :data:`USERS` holds 18 users in 5 families. Users of one family differ in
their *target* (e.g. a 15-word vs a 40-word taste in length, bullets vs numbered lists,
themes of food vs travel vs music), so meta-training can use some targets of a family
and evaluation can hold out others. The split is :data:`TRAIN_USERS` /
:data:`HELDOUT_USERS`; every held-out user's family appears in training with a
different target.

Rewards are deliberately simple surface features: a 135M model can move towards them
from a few labels, and they are exact, so wins are measured without a judge model.
Most rewards are counts, so ties are common between two completions that both lack a
feature; evaluation counts a tie as half a win.

:func:`load_users_file` reads further users from a Python file defining
``USERS = {name: f(prompt, completion) -> float}``.
"""

from __future__ import annotations

import importlib.util
import math
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from metarlhf.data import Pair, Thumbs
from metarlhf.errors import ConfigError, DataError

RewardFn = Callable[[str, str], float]

_WORD = re.compile(r"[A-Za-z']+")
_BULLET = re.compile(r"^\s*[-*\u2022]\s+\S", re.M)
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+\S", re.M)
_CONTRACTION = re.compile(r"\b\w+'(?:s|re|ve|ll|d|t|m)\b", re.I)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def n_words(text: str) -> int:
    return len(words(text))


def _count_any(text: str, vocab: Sequence[str]) -> int:
    low = text.lower()
    return sum(len(re.findall(rf"\b{re.escape(w)}\b", low)) for w in vocab)


# ----------------------------------------------------------------------------- rewards
def length_reward(target_words: int) -> RewardFn:
    """Prefers answers of about ``target_words`` words: ``-|n - target| / target``."""

    def f(prompt: str, completion: str) -> float:
        return -abs(n_words(completion) - target_words) / target_words

    return f


def bullets_reward(prompt: str, completion: str) -> float:
    """Bulleted lists: number of ``- ``/``* `` lines (at most 6), minus numbered lines."""
    return min(len(_BULLET.findall(completion)), 6) - 0.5 * len(_NUMBERED.findall(completion))


def numbered_reward(prompt: str, completion: str) -> float:
    """Numbered lists: number of ``1.`` lines (at most 6), minus bullet lines."""
    return min(len(_NUMBERED.findall(completion)), 6) - 0.5 * len(_BULLET.findall(completion))


def prose_reward(prompt: str, completion: str) -> float:
    """Plain prose: penalises list lines and line breaks."""
    lists = len(_BULLET.findall(completion)) + len(_NUMBERED.findall(completion))
    return -(2.0 * lists + completion.strip().count("\n"))


ENTHUSIASTIC = ("great", "amazing", "awesome", "love", "fantastic", "wonderful", "exciting", "absolutely")
FORMAL = ("therefore", "however", "furthermore", "regarding", "consequently", "moreover", "additionally")
CASUAL = ("hey", "yeah", "cool", "gonna", "kinda", "stuff", "okay", "ok", "pretty")


def enthusiastic_reward(prompt: str, completion: str) -> float:
    """Exclamation marks (at most 5) and upbeat words."""
    return min(completion.count("!"), 5) + _count_any(completion, ENTHUSIASTIC)


def formal_reward(prompt: str, completion: str) -> float:
    """Formal connectives; contractions and exclamation marks count against."""
    return (
        _count_any(completion, FORMAL)
        - 0.5 * len(_CONTRACTION.findall(completion))
        - 0.5 * completion.count("!")
    )


def casual_reward(prompt: str, completion: str) -> float:
    """Contractions and casual words."""
    return 0.5 * len(_CONTRACTION.findall(completion)) + _count_any(completion, CASUAL)


def example_reward(prompt: str, completion: str) -> float:
    """Gives an example."""
    return float(_count_any(completion, ("for example", "for instance", "such as", "e.g", "like")))


def question_back_reward(prompt: str, completion: str) -> float:
    """Asks a question back (question marks, at most 3)."""
    return float(min(completion.count("?"), 3))


THEMES: dict[str, tuple[str, ...]] = {
    "food": ("food", "eat", "eating", "cook", "cooking", "meal", "recipe", "taste", "delicious", "kitchen"),
    "travel": ("travel", "trip", "visit", "journey", "explore", "country", "city", "destination", "tour"),
    "music": ("music", "song", "songs", "sing", "listen", "melody", "band", "play", "sound", "rhythm"),
    "health": ("health", "healthy", "exercise", "sleep", "doctor", "body", "wellness", "stress", "diet"),
    "family": ("family", "friend", "friends", "parents", "children", "kids", "together", "home", "love"),
}


def theme_reward(theme: str) -> RewardFn:
    vocab = THEMES[theme]

    def f(prompt: str, completion: str) -> float:
        return float(_count_any(completion, vocab))

    return f


def you_reward(prompt: str, completion: str) -> float:
    """Second person: 'you'/'your' per 10 words (speaks to me)."""
    n = max(n_words(completion), 1)
    return 10.0 * _count_any(completion, ("you", "your", "yours", "yourself")) / n


def we_reward(prompt: str, completion: str) -> float:
    """First person plural: 'we'/'us'/'our' count."""
    return float(_count_any(completion, ("we", "us", "our", "ours", "let's")))


def plain_words_reward(prompt: str, completion: str) -> float:
    """Plain vocabulary: minus the share of words longer than 8 letters (x10)."""
    ws = words(completion)
    if not ws:
        return -10.0
    return -10.0 * sum(len(w) > 8 for w in ws) / len(ws)


# ----------------------------------------------------------------------------- users
@dataclass(frozen=True)
class SimUser:
    """A simulated user with a true reward and a thumbs-up bar for all-tied groups."""

    name: str
    family: str
    reward_fn: RewardFn
    threshold: float = 0.0

    def reward(self, prompt: str, completion: str) -> float:
        try:
            value = float(self.reward_fn(prompt, completion))
        except Exception as e:  # noqa: BLE001 - user files may define anything
            raise DataError(f"simulated user {self.name!r}: reward function failed: {e}") from e
        if math.isnan(value):
            raise DataError(f"simulated user {self.name!r}: reward is NaN")
        return value

    def thumbs(
        self,
        prompt: str,
        completions: Sequence[str],
        noise: float = 0.0,
        rng: random.Random | None = None,
    ) -> list[Thumbs]:
        """Thumbs on a group of completions for one prompt (above the median = up)."""
        _check_noise(noise)
        rng = rng or random.Random(0)
        scores = [self.reward(prompt, c) for c in completions]
        srt = sorted(scores)
        mid = len(srt) // 2
        median = srt[mid] if len(srt) % 2 else 0.5 * (srt[mid - 1] + srt[mid])
        out = []
        for c, s in zip(completions, scores, strict=True):
            if max(scores) == min(scores):
                label = int(s > self.threshold)
            else:
                label = int(s > median)
            if noise and rng.random() < noise:
                label = 1 - label
            out.append(Thumbs(self.name, prompt, c, label))
        return out

    def pair(self, prompt: str, a: str, b: str, noise: float = 0.0, rng: random.Random | None = None) -> Pair:
        """The user's preference between ``a`` and ``b``."""
        _check_noise(noise)
        rng = rng or random.Random(0)
        ra, rb = self.reward(prompt, a), self.reward(prompt, b)
        a_wins = ra > rb if ra != rb else rng.random() < 0.5
        if noise and rng.random() < noise:
            a_wins = not a_wins
        return Pair(self.name, prompt, a, b) if a_wins else Pair(self.name, prompt, b, a)


def _check_noise(noise: float) -> None:
    if not 0.0 <= noise <= 0.5:
        raise ConfigError(f"label noise must be in [0, 0.5], got {noise}")


def _library() -> dict[str, SimUser]:
    users = [
        SimUser("concise-15", "length", length_reward(15)),
        SimUser("concise-25", "length", length_reward(25)),
        SimUser("thorough-60", "length", length_reward(60)),
        SimUser("thorough-45", "length", length_reward(45)),
        SimUser("bullets", "format", bullets_reward),
        SimUser("numbered", "format", numbered_reward),
        SimUser("prose", "format", prose_reward, threshold=-0.5),
        SimUser("enthusiastic", "tone", enthusiastic_reward),
        SimUser("formal", "tone", formal_reward),
        SimUser("casual", "tone", casual_reward),
        SimUser("gives-example", "content", example_reward),
        SimUser("asks-back", "content", question_back_reward),
        SimUser("theme-food", "content", theme_reward("food")),
        SimUser("theme-travel", "content", theme_reward("travel")),
        SimUser("theme-music", "content", theme_reward("music")),
        SimUser("second-person", "vocabulary", you_reward),
        SimUser("first-plural", "vocabulary", we_reward),
        SimUser("plain-words", "vocabulary", plain_words_reward, threshold=-1.0),
    ]
    return {u.name: u for u in users}


#: The built-in library: name -> user.
USERS: dict[str, SimUser] = _library()

#: Held out from meta-training; each family also has other targets in training.
HELDOUT_USERS: tuple[str, ...] = ("concise-25", "numbered", "enthusiastic", "theme-music", "second-person")
TRAIN_USERS: tuple[str, ...] = tuple(n for n in USERS if n not in HELDOUT_USERS)


def get_users(names: Sequence[str], extra: dict[str, SimUser] | None = None) -> list[SimUser]:
    """Look users up by name in the library (and ``extra``); unknown names raise."""
    pool = {**USERS, **(extra or {})}
    missing = [n for n in names if n not in pool]
    if missing:
        raise ConfigError(f"unknown simulated user(s) {missing}; known: {sorted(pool)}")
    return [pool[n] for n in names]


def get_training_users(names: str | Sequence[str]) -> list[SimUser]:
    """Training users by name (a list or a comma-separated string) for recipe pilots, which
    must never see a held-out user; a held-out or unknown name raises."""
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    wanted = [n for n in wanted if n]
    held = [n for n in wanted if n in HELDOUT_USERS]
    if held:
        raise ConfigError(f"pilot users must be training users; {held} are held out")
    if not wanted:
        raise ConfigError("no training users named")
    return get_users(wanted)


def load_users_file(path: str | Path) -> dict[str, SimUser]:
    """Users from a Python file that defines ``USERS = {name: f(prompt, completion) -> float}``.

    The file is imported with importlib (it is code the caller chose to run). Each
    function is called once on a probe text to check it returns a number.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: users file does not exist")
    if path.suffix != ".py":
        raise DataError(f"{path}: users file must be a Python file (.py)")
    mod_name = f"metarlhf_users_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise DataError(f"{path}: cannot import")
    module = importlib.util.module_from_spec(spec)
    try:
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error in foreign code is bad input
        raise DataError(f"{path}: error while importing users file: {type(e).__name__}: {e}") from e
    finally:
        sys.modules.pop(mod_name, None)
    table = getattr(module, "USERS", None)
    if not isinstance(table, dict) or not table:
        raise DataError(f"{path}: must define a non-empty dict USERS = {{name: f(prompt, completion) -> float}}")
    users: dict[str, SimUser] = {}
    clash = sorted(n for n in table if n in USERS)
    if clash:  # it would replace the built-in user under the same name, in results and guards alike
        raise DataError(f"{path}: USERS names {clash} are built-in simulated users; give them other names")
    for name, fn in table.items():
        if not isinstance(name, str) or not name:
            raise DataError(f"{path}: USERS keys must be non-empty strings, got {name!r}")
        if not callable(fn):
            raise DataError(f"{path}: USERS[{name!r}] is not callable")
        user = SimUser(name, "custom", fn)
        try:
            probe = fn("How are you?", "I am fine, thank you!")
            float(probe)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: USERS[{name!r}](prompt, completion) must return a number: {e}") from e
        users[name] = user
    return users
