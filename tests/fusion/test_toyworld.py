"""The toy world: determinism, every kind through the loader, the reader on ground truth, the scorer."""

from __future__ import annotations

import json
import random

import pytest
import torch

from fusion.data import load_images, read_jsonl
from fusion.toyworld.conversations import HELD_OUT, KINDS, drawn_images, write_split
from fusion.toyworld.evaluate import Scorer, TurnOutput, say
from fusion.toyworld.reader import read_scene
from fusion.toyworld.scenes import CELLS, COLOURS, SHAPES, Obj, make_scene, random_scene, render, scene_from_dicts


def test_reader_scores_every_ground_truth_render_exactly():
    for shape in SHAPES:
        for colour in COLOURS:
            for cell in CELLS:
                s = make_scene([Obj(shape, colour, *cell)])
                assert read_scene(render(s)) == s
    rng = random.Random(123)
    for _ in range(300):
        s = random_scene(rng, rng.randint(0, 3))
        assert read_scene(render(s)) == s
        assert read_scene(render(s, size=96)) == s  # other resolutions too


def test_reader_ignores_small_noise_and_reports_wrong_colour():
    from PIL import ImageDraw

    s = make_scene([Obj("circle", "red", 1, 1)])
    img = render(s)
    ImageDraw.Draw(img).point([(2, 2), (3, 3)], fill=(40, 80, 220))
    assert read_scene(img) == s
    assert read_scene(render(make_scene([Obj("circle", "blue", 1, 1)]))) != s


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return root, {split: write_split(root, split, 36) for split in ("train", "test")}


def test_generation_is_deterministic_per_seed(tmp_path, world):
    root, paths = world
    again = write_split(tmp_path, "train", 36)
    assert again.read_text() == paths["train"].read_text()
    assert write_split(tmp_path, "train", 36, seed=1).read_text() != paths["train"].read_text()
    assert paths["test"].read_text() != paths["train"].read_text()  # disjoint seeds


def test_every_kind_round_trips_through_the_loader(world):
    root, paths = world
    convs = list(read_jsonl(paths["train"]))
    metas = [json.loads(line)["meta"] for line in paths["train"].read_text().splitlines()]
    assert {m["kind"] for m in metas} == set(KINDS) and len(convs) == 36
    for conv, meta in zip(convs, metas):
        loaded = load_images(conv)
        assistant_turns = [m for m in conv.messages if m["role"] == "assistant"]
        assert len(assistant_turns) == len(meta["turns"])
        for msg, turn in zip(assistant_turns, meta["turns"]):
            drawn = [i["image"] for i in msg["content"] if i["type"] == "image"]
            assert len(drawn) == len(turn["images"])
            for path, scene in zip(drawn, turn["images"]):  # the stored image shows the ground-truth scene
                from PIL import Image

                assert read_scene(Image.open(path)) == scene_from_dicts(scene)
        assert loaded.messages


def test_drawn_images_name_the_earlier_image_each_drawing_starts_from(world):
    """drawn_images: the start of an edit shows the edit's source, of a step the previous step (the same scene less
    the new object), of a new drawing nothing; every assistant image once, in order."""
    from PIL import Image

    root, paths = world
    starts = {"edit": 0, "step": 0, "new": 0}
    for conv, line in zip(read_jsonl(paths["train"]), paths["train"].read_text().splitlines()):
        meta = json.loads(line)["meta"]
        items = conv.image_items()
        drawn = drawn_images(meta, [role for role, _ in items])
        assert [k for k, *_ in drawn] == [k for k, (role, _) in enumerate(items) if role == "assistant"]
        for k, turn, j, start in drawn:
            assert scene_from_dicts(turn["images"][j]) == read_scene(Image.open(items[k][1]["image"]))
            if start is None:
                assert "edit" not in turn and (meta["kind"] != "steps" or j == 0)
                starts["new"] += 1
                continue
            assert start < k
            shown = read_scene(Image.open(items[start][1]["image"]))
            if "edit" in turn:
                assert shown == scene_from_dicts(turn["edit"]["source"])
                starts["edit"] += 1
            else:
                assert meta["kind"] == "steps" and j > 0 and set(shown) < set(scene_from_dicts(turn["images"][j]))
                starts["step"] += 1
    assert all(starts.values()), starts


def test_held_out_combinations_never_appear_in_train(world):
    root, paths = world
    for line in paths["train"].read_text().splitlines():
        for turn in json.loads(line)["meta"]["turns"]:
            for scene in turn["images"]:
                assert not any((o["colour"], o["shape"]) in HELD_OUT for o in scene)


def perfect_outputs(meta):
    from PIL import Image  # noqa: F401

    return [TurnOutput([render(scene_from_dicts(s)) for s in t["images"]], t.get("answer") or "") for t in meta["turns"]]


def test_scorer_gives_perfect_outputs_full_marks_and_penalises_mistakes(world):
    root, paths = world
    metas = [json.loads(line)["meta"] for line in paths["test"].read_text().splitlines()]
    perfect = Scorer()
    for m in metas:
        perfect.score(m, perfect_outputs(m))
    r = perfect.report()
    for k, v in r.items():
        if k != "n":
            assert v == 1.0, k
    assert {"trigger_f1", "exact_scene", "edit_applied", "edit_preserved", "tracking", "text_answer", "t2i_1obj"} <= set(r)

    lazy = Scorer()  # never draws, always says "yes"
    for m in metas:
        lazy.score(m, [TurnOutput([], "yes") for _ in m["turns"]])
    r = lazy.report()
    assert r["trigger_recall"] == 0.0 and r["exact_scene"] == 0.0 and r["text_answer"] < 0.5

    copier = Scorer()  # edits that return the source unchanged: applied 0, preserved 1
    for m in metas:
        outs = perfect_outputs(m)
        for t, o in zip(m["turns"], outs):
            if "edit" in t:
                o.images[-1] = render(scene_from_dicts(t["edit"]["source"]))
        copier.score(m, outs)
    r = copier.report()
    assert r["edit_applied"] == 0.0
    assert r["edit_recolour_preserved"] == 1.0 and r.get("edit_add_preserved", 0.0) == 0.0  # same size vs. a missing object


def test_scorer_records_each_turn_in_words(world):
    root, paths = world
    metas = [json.loads(line)["meta"] for line in paths["test"].read_text().splitlines()]
    m = next(m for m in metas if m["kind"] == "edit_user")
    outs = perfect_outputs(m)
    edit = next(t for t in m["turns"] if "edit" in t)["edit"]
    outs[-1].images[-1] = render(scene_from_dicts(edit["source"]))  # the edit left undone
    items: list[dict] = []
    Scorer(items).score(m, outs, {"file": "test.jsonl", "line": 7})
    assert len(items) == len(m["turns"])
    last = items[-1]
    assert last["file"] == "test.jsonl" and last["line"] == 7 and last["kind"] == "edit_user"
    assert last["images"][-1]["exact"] is False and last["images"][-1]["got"] == say(scene_from_dicts(edit["source"]))
    assert last["images"][-1]["want"] == say(scene_from_dicts(m["turns"][-1]["images"][-1]))
    assert last["edit"]["op"] == edit["op"] and last["images_drawn"] == last["images_due"]
    q = next(m for m in metas if m["kind"] == "question")
    items.clear()
    Scorer(items).score(q, [TurnOutput([], "I do not know.")])
    assert items[0]["answered"] is False and items[0]["answer"] == q["turns"][0]["answer"]
    assert say(make_scene([Obj("circle", "red", 0, 0)])) == "red circle at top left" and say(()) == "empty" and say(None) is None


def test_tracking_is_split_by_how_many_images_came_before_the_one_referred_back_to(world):
    root, paths = world
    convs = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    split = {"one": 0, "several": 0}
    wrong_when_several = Scorer()  # a model that edits right with one earlier image and draws the wrong scene with several
    for c in convs:
        m = c["meta"]
        if m["kind"] != "distractor":
            continue
        drawn = [x for msg in c["messages"] if msg["role"] == "assistant" for x in msg["content"] if x["type"] == "image"]
        before = len(drawn) - 1  # counted from the messages: every assistant image but the edit's own
        split["one" if before == 1 else "several"] += 1
        outs = perfect_outputs(m)
        if before > 1:
            outs[-1].images[-1] = render(scene_from_dicts(m["turns"][-1]["edit"]["source"]))  # the unedited source
        wrong_when_several.score(m, outs)
    r = wrong_when_several.report()
    assert split["one"] and split["several"]  # the 36-conversation split holds both
    assert r["n"].get("tracking_one_earlier", 0) == split["one"] and r["n"].get("tracking_several_earlier", 0) == split["several"]
    assert r["tracking_one_earlier"] == 1.0 and r["tracking_several_earlier"] == 0.0
    assert r["tracking"] == split["one"] / (split["one"] + split["several"])


def test_toy_vae_pretraining_learns_and_loads_into_the_vae_slot(tmp_path):
    from diffusers import AutoencoderKL

    from backbones.generator.vae import KLVAE
    from fusion.toyworld.pretrain import pretrain_vae

    stats = pretrain_vae(tmp_path / "vae", steps=25, batch=4, channels=(8, 16, 16), latent_channels=8, progress=False)
    assert stats["last_loss"] < 0.75 * stats["first_loss"]  # seeded: 1.27 -> 0.72 here
    assert 0.0 <= stats["reader_accuracy"] <= 1.0
    slot = KLVAE(AutoencoderKL.from_pretrained(tmp_path / "vae"))
    z = slot.encode(torch.zeros(1, 3, 64, 64))
    assert z.shape == (1, 8, 16, 16)
    assert abs(slot.vae.config.scaling_factor - 1.0) > 0 and (tmp_path / "vae" / "pretrain.json").is_file()


@pytest.mark.slow
def test_toy_vae_reads_back_every_scene_after_full_pretraining(tmp_path):
    from fusion.toyworld.pretrain import pretrain_vae

    stats = pretrain_vae(tmp_path / "vae", progress=False)  # about 4 minutes on 2 cores
    assert stats["reader_accuracy"] >= 0.95, stats


def test_scorer_splits_text_to_image_by_object_count():
    two = [{"shape": "circle", "colour": "red", "row": 0, "col": 0}, {"shape": "square", "colour": "blue", "row": 2, "col": 2}]
    three = two + [{"shape": "triangle", "colour": "green", "row": 1, "col": 1}]
    one = two[:1]
    sc = Scorer()
    for scene in (one, two, two, three):  # the 3-object request is drawn with its third object missing
        meta = {"kind": "t2i", "turns": [{"images": [scene], "answer": None}]}
        drawn = scene_from_dicts(scene[:2])
        sc.score(meta, [TurnOutput([render(drawn)], "")])
    r = sc.report()
    assert r["t2i_1obj"] == 1.0 and r["t2i_2obj"] == 1.0 and r["t2i_3obj"] == 0.0
    assert r["t2i_multi"] == pytest.approx(2 / 3) and r["n"]["t2i_3obj"] == 1 and r["n"]["t2i_2obj"] == 2


def test_edit_preservation_is_also_reported_where_the_edited_image_was_drawn_right(world):
    """A model that draws a stray object into its first picture and then edits that picture faithfully (the stray
    object kept): edit_preserved counts its edits against the true source and fails them; edit_preserved_source_right
    judges only the edits whose image was in context as it should be (here the user's images)."""
    from fusion.toyworld.scenes import Obj, make_scene

    root, paths = world
    metas = [json.loads(line)["meta"] for line in paths["test"].read_text().splitlines()]
    sc = Scorer()
    user = generated = 0
    for m in metas:
        if m["kind"] not in ("edit_user", "edit_generated", "distractor"):
            continue
        outs = perfect_outputs(m)
        if m["kind"] == "edit_user":
            user += 1
        else:
            generated += 1
            edit = m["turns"][-1]["edit"]
            src, edited = scene_from_dicts(edit["source"]), scene_from_dicts(m["turns"][-1]["images"][-1])
            free = next((r, c) for r in range(3) for c in range(3) if all(o.cell != (r, c) for o in (*src, *edited)))
            stray = Obj("circle", "red", *free)
            outs[0].images[0] = render(make_scene([*src, stray]))  # the edit's source, drawn with a stray object
            outs[-1].images[-1] = render(make_scene([*edited, stray]))  # the edit applied to what was drawn
        sc.score(m, outs)
    r = sc.report()
    assert user and generated
    assert r["n"]["edit_source_right"] == user + generated and r["edit_source_right"] == user / (user + generated)
    assert r["n"]["edit_preserved_source_right"] == user and r["edit_preserved_source_right"] == 1.0
    assert r["edit_preserved"] == user / (user + generated)  # against the true source: the stray object fails them

    perfect = Scorer()
    for m in metas:
        perfect.score(m, perfect_outputs(m))
    assert perfect.report()["edit_source_right"] == 1.0 == perfect.report()["edit_preserved_source_right"]


def test_dit_pretraining_edits_can_weight_recolours():
    """make_toy's dit_p_recolour: that share of the toy DiT's pretraining edits are recolours, the rest the other
    operations; 0 keeps the world's own choice (the scenes drawn stay those of before: the same random sequence)."""
    from collections import Counter

    from fusion.config import MakeToyConfig
    from fusion.errors import ConfigError
    from fusion.toyworld.conversations import EditMix, random_edit, random_edit_scenes, sample_scene
    from fusion.toyworld.pretrain import dit_batch

    ops = Counter(e[2] for e in dit_batch(random.Random(3), 3000, 1.0, mix=EditMix(p_recolour=0.6))[1])
    assert abs(ops["recolour"] / 3000 - 0.6) < 0.04 and all(ops[o] > 100 for o in ("move", "add", "remove"))
    a, b = random.Random(5), random.Random(5)
    for _ in range(200):  # p_recolour=0 takes no extra random draw: the scenes of the toy DiTs built before stay the same
        s = sample_scene(b, b.choice([1, 2, 2, 3]), frozenset())
        _, edited, meta = random_edit(b, s, frozenset())
        assert random_edit_scenes(a)[:3] == (s, edited, meta["op"])
    # pinned: what the code before the option drew (the world's op list, its order, one choice per edit)
    pinned = random.Random(5)
    assert [random_edit_scenes(pinned)[2] for _ in range(12)] == ["recolour", "move", "recolour", "move", "move", "add", "move",
                                                                  "move", "add", "recolour", "recolour", "remove"]
    with pytest.raises(ConfigError, match="dit_p_recolour"):
        MakeToyConfig(dit_p_recolour=1.5)


def test_dit_pretraining_edits_can_favour_scenes_where_the_colour_word_fits_two_objects():
    """make_toy's dit_p_shared_colour: that share of the pretraining edits is redrawn until another object of the
    scene has the colour of the object the edit changes (a recolour's old colour, a moved or removed object's, an
    added object's own); the rest are drawn as the world draws them, and every operation stays in the mix."""
    from collections import Counter

    from fusion.config import MakeToyConfig
    from fusion.errors import ConfigError
    from fusion.toyworld.conversations import EditMix, edited_object, random_edit_scenes, shares
    from fusion.toyworld.scenes import Obj

    red_circle, red_square, blue_square = Obj("circle", "red", 0, 0), Obj("square", "red", 1, 1), Obj("square", "blue", 2, 2)
    source = [red_circle, blue_square]
    assert shares([red_circle, red_square], "recolour", Obj("circle", "green", 0, 0))  # the old colour counts
    assert not shares(source, "recolour", Obj("circle", "blue", 0, 0))  # not the new one
    assert edited_object(source, "move", Obj("circle", "red", 2, 0)) == red_circle
    assert shares(source, "add", Obj("triangle", "blue", 1, 0)) and not shares(source, "remove", red_circle)
    assert shares([red_square, blue_square], "remove", blue_square, "shape") and not shares(source, "remove", red_circle, "shape")

    def draw(mix, n=2000):
        rng = random.Random(11)
        return [random_edit_scenes(rng, frozenset(), mix) for _ in range(n)]

    plain, mixed = draw(EditMix()), draw(EditMix(p_shared_colour=0.5))
    share = [sum(shares(s, op, t) for s, _, op, t in items) / len(items) for items in (plain, mixed)]
    assert share[0] < 0.25 and abs(share[1] - (0.5 + 0.5 * share[0])) < 0.05, share
    assert all(n > 200 for n in Counter(op for _, _, op, _ in mixed).values()) and len(Counter(op for _, _, op, _ in mixed)) == 4
    both = draw(EditMix(p_shared_colour=0.3, p_shared_shape=0.4))
    by_shape = [sum(shares(s, op, t, "shape") for s, _, op, t in items) / len(items) for items in (plain, both)]
    assert abs(by_shape[1] - (0.4 + 0.6 * by_shape[0])) < 0.06, by_shape
    assert abs(sum(shares(s, op, t) for s, _, op, t in both) / len(both) - (0.3 + 0.7 * share[0])) < 0.06
    # a shape share of 0 leaves the draws of a colour share alone (a build with only the colour share stays cached)
    assert draw(EditMix(p_shared_colour=0.5), 300) == draw(EditMix(p_shared_colour=0.5, p_shared_shape=0.0), 300)
    with pytest.raises(ConfigError, match="dit_p_shared_colour"):
        MakeToyConfig(dit_p_shared_colour=-0.1)
    with pytest.raises(ConfigError, match="dit_p_shared_shape"):
        MakeToyConfig(dit_p_shared_colour=0.6, dit_p_shared_shape=0.5)


def test_the_source_of_an_edit_is_the_first_drawing_of_its_scene():
    """A distractor turn may draw the edit's source scene again: the edit refers back to the first picture, so that
    one decides edit_source_right, whatever the later copy looks like."""
    from fusion.toyworld.scenes import scene_to_dicts

    src = make_scene([Obj("circle", "red", 0, 0)])
    edited = make_scene([Obj("circle", "blue", 0, 0)])
    wrong = make_scene([Obj("square", "red", 0, 0)])
    meta = {"kind": "distractor", "turns": [
        {"images": [scene_to_dicts(src)], "answer": None},
        {"images": [scene_to_dicts(src)], "answer": None},  # the same scene drawn again by a distractor turn
        {"images": [scene_to_dicts(edited)], "answer": None, "refers_back": True,
         "edit": {"op": "recolour", "target": edited[0].to_dict(), "source": scene_to_dicts(src)}}]}
    for first, again, right in ((wrong, src, False), (src, wrong, True)):
        sc = Scorer()
        sc.score(meta, [TurnOutput([render(first)]), TurnOutput([render(again)]), TurnOutput([render(edited)])])
        assert sc.report()["edit_source_right"] == float(right), (first, again)


def test_the_distillation_corpus_is_text_only_and_holds_every_pair(tmp_path):
    """toyworld/distill.jsonl (make_toy's n_distill, the toy stage 2's stage.distill_data): text-to-image requests, each
    drawing an image item without a file, over every (colour, shape) pair, the train split's held-out ones too; no image
    written; the same lines for the same seed."""
    from fusion.data import drawings_as_placeholders
    from fusion.toyworld.conversations import write_distill_corpus

    path = write_distill_corpus(tmp_path, 200, seed=0)
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(raw) == 200 and not (tmp_path / "images").exists()
    assert all(item == {"type": "image"} for r in raw for m in r["messages"] for item in m["content"] if item["type"] == "image")
    pairs = {(d["colour"], d["shape"]) for r in raw for im in r["meta"]["turns"][0]["images"] for d in im}
    assert pairs == {(c, s) for c in COLOURS for s in SHAPES} and HELD_OUT <= pairs
    convs = list(read_jsonl(path, convert=drawings_as_placeholders))
    assert all(c.num_target_images() == 1 and c.text_before_image(0) for c in convs)
    assert write_distill_corpus(tmp_path / "again", 200, seed=0).read_text() == path.read_text()
