"""Prompt files, rank sharding and the training sampler (reward_forcing.data)."""
import itertools
from pathlib import Path

import pytest

from reward_forcing.data import Prompt, PromptSampler, read_prompts, shard_for_rank

REPO_ROOT = Path(__file__).resolve().parents[1]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------- read_prompts
def test_read_prompts_keeps_line_indices(tmp_path):
    f = write(tmp_path / "p.txt", "a cat\n\n  a dog running  \r\n\nwaves\n")
    prompts = read_prompts(f)
    assert prompts == [Prompt(0, "a cat"), Prompt(2, "a dog running"), Prompt(4, "waves")]
    assert prompts[1].conditioning == "a dog running"


def test_read_prompts_with_extended(tmp_path):
    f = write(tmp_path / "p.txt", "a cat\n\nwaves")  # no final newline
    e = write(tmp_path / "e.txt", "A fluffy cat.\n\nOcean waves at dusk.\n")
    prompts = read_prompts(f, e)
    assert [(p.index, p.text, p.conditioning) for p in prompts] == [
        (0, "a cat", "A fluffy cat."), (2, "waves", "Ocean waves at dusk.")]


def test_read_prompts_unicode_and_bom(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeff一只猫\u2028在弹钢琴\nCafé\n".encode("utf-8"))
    assert [p.text for p in read_prompts(f)] == ["一只猫\u2028在弹钢琴", "Café"]


def test_read_prompts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="no prompts in .*empty.txt"):
        read_prompts(write(tmp_path / "empty.txt", "\n  \n\n"))
    f = write(tmp_path / "p.txt", "a\nb\nc\n")
    with pytest.raises(ValueError) as err:
        read_prompts(f, write(tmp_path / "e.txt", "A\nB\n"))
    assert "2 lines" in str(err.value) and "3" in str(err.value)
    with pytest.raises(ValueError, match="line 2"):
        read_prompts(f, write(tmp_path / "e2.txt", "A\n\nC\n"))
    with pytest.raises(FileNotFoundError, match="ext.txt"):
        read_prompts(f, tmp_path / "ext.txt")


def test_benchmark_style_pair(tmp_path):
    """A short list and its LLM-extended twin, shaped like the public benchmark lists: long lines with commas,
    quotes and non-ASCII text, UTF-8, final newline. Line i of one pairs with line i of the other."""
    short = ["A red fox trots across fresh snow at dawn, breath steaming.",
             'A barista pours latte art shaped like a "fern" into a white cup.',
             "Waves roll onto a black-sand beach in Vík, slow motion."]
    extended = [s + " " + ", ".join(["the camera glides slowly", "soft light", "fine detail"] * 30) for s in short]
    base = write(tmp_path / "bench.txt", "\n".join(short) + "\n")
    ext = write(tmp_path / "bench_extended.txt", "\n".join(extended) + "\n")
    prompts = read_prompts(base, ext)
    assert [(p.index, p.text, p.conditioning) for p in prompts] == list(zip(range(3), short, extended))
    assert all(len(p.conditioning) > 500 for p in prompts)
    with pytest.raises(ValueError, match="2 lines"):  # a truncated twin is refused, not silently zipped
        read_prompts(base, write(tmp_path / "cut_extended.txt", "\n".join(extended[:2]) + "\n"))


@pytest.mark.parametrize("relpath", ["MovieGenVideoBench.txt", "vbench/all_dimension.txt"])
def test_public_prompt_lists_if_fetched(relpath):
    """Optional: the real lists, only where `python scripts/fetch_prompts.py` has put them into prompts/."""
    base = REPO_ROOT / "prompts" / relpath
    if not base.is_file():
        pytest.skip(f"optional: {base} is not fetched (python scripts/fetch_prompts.py); "
                    "test_benchmark_style_pair covers the same reading rules")
    count = _fetch_module().FILES[relpath]
    prompts = read_prompts(base, base.with_name(base.stem + "_extended.txt"))
    assert len(prompts) == count
    assert [p.index for p in prompts] == list(range(count))
    assert all(p.text and p.extended for p in prompts)


# ------------------------------------------------------------------------------------------ sharding
@pytest.mark.parametrize("n,world", [(1003, 8), (10, 3), (2, 4), (8, 8), (0, 2)])
def test_shard_for_rank_drops_nothing(n, world):
    items = list(range(n))
    shards = [shard_for_rank(items, r, world) for r in range(world)]
    assert sorted(itertools.chain(*shards)) == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards[1 % world][:2] == items[1 % world::world][:2]


def test_shard_for_rank_bad_rank():
    with pytest.raises(ValueError, match="rank=2"):
        shard_for_rank([1, 2], 2, 2)


# ------------------------------------------------------------------------------------------- sampler
def take(sampler, n):
    return [next(sampler) for _ in range(n)]


def test_sampler_epochs_cover_all_and_reshuffle():
    items = list(range(12))
    s = PromptSampler(items, seed=3)
    e0, e1 = take(s, 12), take(s, 12)
    assert sorted(e0) == items and sorted(e1) == items
    assert e0 != e1  # a new order each epoch
    assert s.epoch == 1
    assert take(PromptSampler(items, seed=3), 12) == e0  # seeded
    assert take(PromptSampler(items, seed=4), 12) != e0


def test_sampler_ranks_disjoint_and_complete():
    items = list(range(12))
    per_rank = [take(PromptSampler(items, rank=r, world_size=3, seed=1), 4) for r in range(3)]
    assert sorted(itertools.chain(*per_rank)) == items


def test_sampler_uneven_pads_and_stays_in_step():
    items = list(range(10))
    samplers = [PromptSampler(items, rank=r, world_size=4, seed=0) for r in range(4)]
    epoch0 = [take(s, 3) for s in samplers]
    assert set(itertools.chain(*epoch0)) == set(items)  # none dropped; 2 items padded
    assert all(s.epoch == 0 for s in samplers)
    next(samplers[0])
    assert samplers[0].epoch == 1


def test_sampler_resume():
    items = [f"p{i}" for i in range(7)]
    ref = PromptSampler(items, rank=1, world_size=2, seed=5)
    expected = take(ref, 20)
    s = PromptSampler(items, rank=1, world_size=2, seed=5)
    take(s, 9)
    state = s.state_dict()
    resumed = PromptSampler(items, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(state)
    assert take(resumed, 11) == expected[9:]


@pytest.mark.parametrize("new_world", [1, 3, 4])
def test_sampler_resume_on_another_number_of_ranks_repartitions_the_epoch(new_world):
    items = list(range(23))
    old = [PromptSampler(items, rank=r, world_size=2, seed=5) for r in range(2)]
    seen = [x for _ in range(4) for s in old for x in take(s, 1)]  # 4 steps on 2 ranks: 8 items of epoch 0
    state = old[0].state_dict()  # all ranks stand at the same position; the trainer saves rank 0's
    new = [PromptSampler(items, rank=r, world_size=new_world, seed=5) for r in range(new_world)]
    for s in new:
        s.load_state_dict(state)
    per_rank = -(-15 // new_world)
    rest = [x for s in new for x in take(s, per_rank)]
    assert sorted(set(seen + rest)) == items  # the epoch is completed: nothing skipped
    assert len(seen + rest) == 8 + per_rank * new_world  # repeats only as padding, as in any uneven epoch
    assert all(s.epoch == 0 for s in new)
    # Then whole epochs on the new layout, as a fresh sampler with this many ranks has them.
    fresh = [PromptSampler(items, rank=r, world_size=new_world, seed=5) for r in range(new_world)]
    for s_new, s_fresh in zip(new, fresh):
        take(s_fresh, -(-23 // new_world))
        assert take(s_new, 5) == take(s_fresh, 5) and s_new.epoch == 1


def test_sampler_resume_on_another_number_of_ranks_at_the_end_of_an_epoch():
    done = PromptSampler(list(range(7)), world_size=2, seed=5)
    take(done, 4)  # 2 ranks x 4 = the whole (padded) epoch
    resumed = PromptSampler(list(range(7)), world_size=3, seed=5)
    resumed.load_state_dict(done.state_dict())
    assert (resumed.epoch, resumed.start, resumed.position) == (1, 0, 0)


def test_sampler_resume_refuses_another_prompt_list_or_seed():
    s = PromptSampler(list(range(7)), world_size=2, seed=5)
    with pytest.raises(ValueError, match="num_items"):
        PromptSampler(list(range(8)), world_size=2, seed=5).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(list(range(7)), world_size=2, seed=6).load_state_dict(s.state_dict())


def test_sampler_no_shuffle_and_prompts():
    prompts = [Prompt(i, f"p{i}") for i in range(3)]
    s = PromptSampler(prompts, shuffle=False)
    assert [p.index for p in take(s, 6)] == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError):
        PromptSampler([])


# ------------------------------------------------------------------------------ scripts/fetch_prompts.py
def _fetch_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fetch_prompts", REPO_ROOT / "scripts" / "fetch_prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fetch_prompts_url_table_and_args(tmp_path):
    fp = _fetch_module()
    assert set(fp.FILES) == {"MovieGenVideoBench.txt", "MovieGenVideoBench_extended.txt",
                             "vbench/all_dimension.txt", "vbench/all_dimension_extended.txt"}
    urls = fp.urls_for("vbench/all_dimension.txt")
    assert urls[0].startswith("https://raw.githubusercontent.com/JaydenLyh/Reward-Forcing/")
    assert all(u.endswith("/prompts/vbench/all_dimension.txt") for u in urls)
    args = fp.parse_args(["--dest", str(tmp_path), "--force"])
    assert args.dest == tmp_path and args.force and not args.list
    assert fp.parse_args([]).dest == REPO_ROOT / "prompts"


def test_fetch_prompts_without_network(tmp_path, monkeypatch):
    fp = _fetch_module()
    served = {}

    def fake_download(url):
        if url not in served:
            raise fp.urllib.error.URLError("no network in tests")
        return served[url]

    monkeypatch.setattr(fp, "download", fake_download)
    rel = "vbench/all_dimension.txt"
    first, second = fp.urls_for(rel)
    with pytest.raises(RuntimeError, match="no network"):
        fp.fetch_one(rel, 3, tmp_path)
    assert not (tmp_path / "vbench" / "all_dimension.txt").exists()
    served[first] = "a\nb\n"          # wrong line count: falls back to the second source
    served[second] = "a\nb\nc\n"
    assert second in fp.fetch_one(rel, 3, tmp_path)
    assert (tmp_path / rel).read_text() == "a\nb\nc\n"
    assert "already present" in fp.fetch_one(rel, 3, tmp_path)
    assert fp.main(["--dest", str(tmp_path / "other")]) == 1  # the other lists are not served
