"""The caption controls (Settings.prompt): every model attack under the true caption, the empty prompt, a
neutral prompt and another image's caption."""

from __future__ import annotations

import pandas as pd
import pytest

import helpers
from mialib import imagesets, runs
from mialib.attacks import REGISTRY
from mialib.attacks.registry import assert_within_tolerance, within_tolerance
from mialib.inversion import NEUTRAL_PROMPT, prompt_texts
from mialib.settings import Settings
from mialib.target import load_target


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with helpers.one_thread():
        yield


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("caption_controls") / "model"
    helpers.save_tiny_pipeline(folder)
    return load_target(folder)


@pytest.fixture(scope="module")
def imageset(tmp_path_factory):
    captions = ["red apple", "green apple", "red apple", "a cat", "a dog", "a dog", "blue car", "sun"]
    folder = helpers.write_imagefolder(tmp_path_factory.mktemp("caption_set") / "set", n=8, captions=captions)
    return imagesets.open_imageset(f"imagefolder:{folder}")


def test_each_control_gives_the_texts_it_names(imageset):
    captions = list(imageset.records["caption"])
    assert list(runs.prompted(imageset, "caption").records["caption"]) == captions
    assert list(runs.prompted(imageset, "empty").records["caption"]) == [""] * 8
    assert list(runs.prompted(imageset, "neutral").records["caption"]) == [NEUTRAL_PROMPT] * 8
    other = runs.prompted(imageset, "other").records.set_index("id")["caption"]
    mine = imageset.records.set_index("id")["caption"]
    assert (other != mine).all() and set(other) <= set(mine)  # another image's caption, never its own
    # the next image in id order whose caption differs, whatever order or subset the set comes in
    ids = sorted(mine.index)
    for k, i in enumerate(ids):
        following = [mine[j] for j in ids[k + 1 :] + ids[:k] if mine[j] != mine[i]]
        assert other[i] == following[0]
    shuffled = imageset.select(list(reversed(imageset.records["id"])))
    assert runs.prompted(shuffled, "other").records.set_index("id")["caption"].to_dict() == other.to_dict()
    same = imageset.with_captions(["one caption"] * 8)
    with pytest.raises(ValueError, match="needs two different captions"):
        runs.prompted(same, "other")
    with pytest.raises(ValueError, match="prompt must be one of"):
        prompt_texts(["x"], "neutral prompt")
    with pytest.raises(ValueError, match="prompt must be one of caption, empty, neutral, other"):
        Settings(prompt="random")


@pytest.mark.parametrize("prompt", ["empty", "neutral", "other"])
@pytest.mark.parametrize("attack", ["structural", "loss", "pia", "secmi", "clid"])
def test_every_attack_scores_the_control_as_its_function_on_those_texts(target, imageset, tmp_path, attack, prompt):
    settings = Settings(prompt=prompt)
    values = runs.attack_values(
        target, imageset, REGISTRY[attack], REGISTRY[attack].params(), settings, tmp_path, 3, 32, progress=False
    )
    controlled = runs.prompted(imageset, prompt)
    pixels = imageset.load(32)
    texts = list(controlled.records["caption"])
    spec = REGISTRY[attack]
    direct = spec.function(
        target, pixels, texts, list(imageset.records["id"]), **spec.params(), **Settings().for_function(spec.function)
    )  # the texts as captions
    got = values.set_index("id").loc[list(imageset.records["id"])]
    assert_within_tolerance(spec, spec.params(), got["score"].to_numpy(), direct.scores, direct.extras)
    own = runs.attack_values(target, imageset, spec, spec.params(), Settings(), tmp_path, 3, 32, progress=False)
    mine = own.set_index("id").loc[got.index]
    assert not within_tolerance(spec, spec.params(), mine["score"], got["score"], mine).all()  # the texts matter


def test_clid_under_the_empty_prompt_has_nothing_to_contrast(target, imageset, tmp_path):
    """CLiD contrasts the caption with a reduced and a null prompt; under the empty prompt all three are
    empty, and its score is exactly 0: what is left of it is the caption's own signal."""
    values = runs.attack_values(
        target,
        imageset,
        REGISTRY["clid"],
        REGISTRY["clid"].params(),
        Settings(prompt="empty"),
        tmp_path,
        4,
        32,
        progress=False,
    )
    assert (values["score"] == 0).all()
    assert isinstance(values, pd.DataFrame)


def test_the_command_line_offers_every_control_and_encoding():
    from mialib import cli
    from mialib.settings import ENCODE_MODES, PROMPTS, SCHEDULES

    commands = cli.build_parser()._subparsers._group_actions[0].choices
    for command in ("score", "audit"):
        actions = {action.dest: action for action in commands[command]._actions}
        assert tuple(actions["prompt"].choices) == PROMPTS
        assert tuple(actions["encode_mode"].choices) == ENCODE_MODES
        assert tuple(actions["schedule"].choices) == tuple(SCHEDULES)
