"""VideoReward: preprocessing parity with transformers' Qwen2-VL processor, batched frozen scoring,
normalisation, the reference switches, VideoAlign's prompt template (parsed, never executed) and loading the
released folder layout (tiny random models through the real loading code)."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, elementwise_atol
from reward_forcing import checkpoints as ckpt
from reward_forcing.build import build_reward
from reward_forcing.config import load_config
from reward_forcing.models.video_reward import (
    CLIP_MEAN, CLIP_STD, DEFAULT_NORMALIZATION, DEFAULT_PROMPT_TEMPLATE, EVAL_DIMS, QWEN2_VL_2B_INSTRUCT,
    REWARD_TOKENS, TINY_PEFT_CONFIG, VideoPreprocessConfig, VideoReward, VideoRewardModel, apply_lora,
    fill_prompt, find_lora_targets, patchify_video, preprocess_video, read_prompt_template, sample_frame_indices,
    select_checkpoint_dir, smart_resize, tiny_qwen2_vl_config, to_current_layout,
)

H, W = 56, 84  # a multiple of 28 on both sides: 4x6 patches, 6 merged tokens per temporal patch
FIXTURE_TEMPLATE = REPO_ROOT / "tests" / "fixtures" / "videoalign_prompt_template.py"
TINY_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"


def _videos(b, t=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, 3, H, W, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def tiny():
    return VideoReward.tiny(seed=0)


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------
def test_smart_resize_numbers():
    assert smart_resize(480, 832, 28, 3136, 200704) == (336, 588)
    assert smart_resize(480, 832, 28, 128 * 28 * 28, 200704) == (336, 588)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    for h, w, lo, hi in [(480, 832, 3136, 200704), (56, 84, 3136, 200704), (100, 50, 100352, 200704),
                         (1080, 1920, 3136, 602112), (30, 31, 3136, 200704)]:
        assert smart_resize(h, w, 28, lo, hi) == tuple(hf_smart_resize(h, w, 28, lo, hi))


def test_frame_sampling_counts():
    idx = sample_frame_indices(81, VideoPreprocessConfig())  # 81 frames at 16 fps -> 2 fps
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 80
    assert torch.all(idx[1:] > idx[:-1])
    assert len(sample_frame_indices(81, VideoPreprocessConfig(sample_all_frames=True))) == 81
    assert len(sample_frame_indices(81, VideoPreprocessConfig(fps=4.0))) == 20
    assert len(sample_frame_indices(16, VideoPreprocessConfig())) == 4  # min_frames 4
    assert len(sample_frame_indices(1, VideoPreprocessConfig())) == 1  # an image; padded to 2 later

    video = torch.zeros(81, 3, H, W)
    _, grid = preprocess_video(video, VideoPreprocessConfig(min_pixels=3136))
    assert grid == (5, 4, 6)
    _, grid = preprocess_video(video, VideoPreprocessConfig(min_pixels=3136, sample_all_frames=True))
    assert grid == (41, 4, 6)  # 81 frames padded to 82 by repeating the last one


def test_resize_to_reference_size():
    video = torch.rand(3, 3, 480, 832) * 2 - 1
    patches, grid = preprocess_video(video, VideoPreprocessConfig(sample_all_frames=True))
    assert grid == (2, 24, 42)  # 336 x 588
    assert patches.shape == (2 * 24 * 42, 3 * 2 * 14 * 14)


@pytest.mark.parametrize("size", [(56, 84), (84, 112)])
def test_patchify_matches_transformers_pil_processor(size):
    """Qwen2-VL treats an image as two identical frames; our video path must give its exact rows."""
    from transformers import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    hf = Qwen2VLImageProcessorPil(do_resize=False)(images=[image], return_tensors="pt")
    ref = hf["pixel_values"].float()

    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0  # [3, H, W] in [0, 1]
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    ours, grid = patchify_video(((x - mean) / std)[None].repeat(2, 1, 1, 1))
    assert list(grid) == hf["image_grid_thw"][0].tolist()
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= elementwise_atol(ref)

    # The full pipeline from both input conventions: float [-1, 1] channels-first and uint8 channels-last.
    pre = VideoPreprocessConfig(min_pixels=28 * 28)
    full, grid2 = preprocess_video((x * 2 - 1)[None], pre)
    assert grid2 == grid
    assert (full - ref).abs().max().item() <= elementwise_atol(ref)
    from_uint8, grid3 = preprocess_video(torch.from_numpy(image)[None], pre)
    assert grid3 == grid
    assert (from_uint8 - ref).abs().max().item() <= elementwise_atol(ref)


def test_bad_video_shapes():
    with pytest.raises(ValueError, match=r"uint8 frames \[T, H, W, 3\]"):
        preprocess_video(torch.zeros(4, 3, H, W, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"float video \[T, 3, H, W\]"):
        preprocess_video(torch.zeros(4, H, W, 3))


def test_pixel_range_default_vs_reference():
    video = torch.full((4, 3, H, W), -1.0)
    expect = {False: 0.0, True: -1.0}  # correct [0, 1] range vs the reference's [-1, 1]
    for reference, pixel in expect.items():
        for clip in (video, torch.zeros(4, H, W, 3, dtype=torch.uint8)):  # black, float and uint8
            patches, _ = preprocess_video(clip, VideoPreprocessConfig(min_pixels=3136, reference_pixel_range=reference))
            per_channel = patches.view(patches.shape[0], 3, -1)
            for c in range(3):
                want = (pixel - CLIP_MEAN[c]) / CLIP_STD[c]
                assert torch.allclose(per_channel[:, c], torch.full_like(per_channel[:, c], want), atol=1e-6)
    a, _ = preprocess_video(video * 0.3, VideoPreprocessConfig(min_pixels=3136))
    b, _ = preprocess_video(video * 0.3, VideoPreprocessConfig(min_pixels=3136, reference_pixel_range=True))
    assert not torch.allclose(a, b)


# --------------------------------------------------------------------------------------------------
# VideoAlign's prompt template
# --------------------------------------------------------------------------------------------------
def test_template_is_parsed_not_executed_and_filled_like_videoalign():
    template = read_prompt_template(FIXTURE_TEMPLATE, "detailed_special")  # the fixture raises if executed
    assert template.startswith("\nThree judges look at one generated video.") and template.endswith("END\n")
    assert all(template.count(tok) == 1 for tok in REWARD_TOKENS)
    prompt = 'a {braced} cat says "hi" \\ {0}'
    filled = fill_prompt(template, prompt)
    assert filled == template.replace("{text_prompt}", prompt)  # the fixture has no other field or brace
    assert "Prompt - " + prompt + "\n" in filled


def test_template_errors(tmp_path):
    with pytest.raises(ValueError, match="'detailed'.*detailed_special"):
        read_prompt_template(FIXTURE_TEMPLATE, "detailed")  # no reward tokens in that template
    with pytest.raises(FileNotFoundError, match="nowhere.py"):
        read_prompt_template(tmp_path / "nowhere.py", "detailed_special")
    cases = {
        "computed.py": ("DETAILED_PROMPT_WITH_SPECIAL_TOKEN = make_prompt()\n", "not a plain string literal"),
        "broken.py": ("DETAILED_PROMPT_WITH_SPECIAL_TOKEN = '''\n", "cannot be parsed"),
        "absent.py": ("OTHER = 'x'\n", "assigns DETAILED_PROMPT_WITH_SPECIAL_TOKEN 0 times"),
        "no_mq.py": ("DETAILED_PROMPT_WITH_SPECIAL_TOKEN = '{text_prompt} <|VQ_reward|> <|TA_reward|>'\n",
                     "exactly once"),
        "no_field.py": ("DETAILED_PROMPT_WITH_SPECIAL_TOKEN = '<|VQ_reward|> <|MQ_reward|> <|TA_reward|>'\n",
                        "no '{text_prompt}' field"),
        "extra_field.py": ("DETAILED_PROMPT_WITH_SPECIAL_TOKEN = "
                           "'{text_prompt} {dimension_name} <|VQ_reward|> <|MQ_reward|> <|TA_reward|>'\n",
                           "only '{text_prompt}'"),
    }
    for name, (source, message) in cases.items():
        (tmp_path / name).write_text(source)
        with pytest.raises(ValueError) as err:
            read_prompt_template(tmp_path / name, "detailed_special")
        assert message in str(err.value) and name in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------
def test_text_and_placeholders(tiny):
    inputs = tiny.prepare_inputs(_videos(1), ["a cat"])
    ids = inputs["input_ids"][0]
    n_video = int((ids == tiny.video_token_id).sum())
    grid = inputs["video_grid_thw"][0]
    assert n_video == int(grid.prod()) // 4 == 12  # t 2 x h 4 x w 6 / merge 2^2
    assert inputs["pixel_values_videos"].shape == (int(grid.prod()), 1176)
    text = tiny.build_text("a cat")
    assert text.index("<|video_pad|>") < text.index("a cat") < text.index("<|VQ_reward|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert tiny.prompt_template == DEFAULT_PROMPT_TEMPLATE


def test_scores_every_sample(tiny):
    videos = _videos(3)
    prompts = ["a cat", "a dog running through a field of flowers", "waves"]  # different lengths: padding
    out = tiny.score(videos, prompts)
    assert set(out) == {"VQ", "MQ", "TA", "raw"}
    assert out["raw"].shape == (3, 3) and out["raw"].dtype == torch.float32
    for dim in EVAL_DIMS:
        assert out[dim].shape == (3,) and out[dim].dtype == torch.float32
    assert not torch.allclose(out["raw"][0], out["raw"][1])
    assert not torch.allclose(out["raw"][1], out["raw"][2])
    for i in range(3):
        alone = tiny.score(videos[i:i + 1], prompts[i])
        torch.testing.assert_close(alone["raw"][0], out["raw"][i], atol=1e-5, rtol=1e-5)
    chunked = tiny.score(videos, prompts, max_batch_size=2)
    torch.testing.assert_close(chunked["raw"], out["raw"], atol=1e-5, rtol=1e-5)
    # Same video, other prompt -> other scores (the prompt conditions every reward token).
    other = tiny.score(videos[:1], "a completely different prompt")
    assert not torch.allclose(other["raw"][0], out["raw"][0])


def test_uint8_frames_and_source_fps(tiny):
    videos = _videos(2)
    frames = ((videos + 1) * 127.5).round().to(torch.uint8)  # exact in [-1, 1] below
    as_float = frames.float() / 127.5 - 1
    from_uint8 = tiny.score(frames.permute(0, 1, 3, 4, 2), "a cat")  # [B, T, H, W, 3], as read from a file
    torch.testing.assert_close(from_uint8["raw"], tiny.score(as_float, "a cat")["raw"], atol=1e-5, rtol=1e-5)
    # 16 frames recorded at 4 fps last 4 s: 8 frames at 2 fps instead of the 4 (min_frames) of 1 s at 16 fps.
    slow = tiny.score(videos, "a cat", source_fps=4)
    at_4fps = dataclasses.replace(tiny.preprocess, source_fps=4.0)
    assert tiny.prepare_inputs(videos[:1], "a cat", at_4fps)["video_grid_thw"][0, 0] == 4
    torch.testing.assert_close(slow["raw"], tiny.raw_scores(videos, "a cat", at_4fps), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(slow["raw"], tiny.score(videos, "a cat")["raw"])
    with pytest.raises(ValueError, match="source_fps"):
        tiny.score(videos, "a cat", source_fps=0)


def test_frozen_and_no_graph(tiny):
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not any(m.training for m in tiny.modules())
    videos = _videos(2).requires_grad_(True)
    out = tiny.score(videos, "a cat")
    assert all(v.grad_fn is None and not v.requires_grad for v in out.values())


def test_normalisation():
    norm = {"VQ": (1.0, 2.0), "MQ": (-0.5, 0.25), "TA": (3.0, 4.0)}
    reward = VideoReward.tiny(seed=0, normalization=norm)
    out = reward.score(_videos(2), ["a", "b"])
    for j, dim in enumerate(EVAL_DIMS):
        mean, std = norm[dim]
        torch.testing.assert_close(out[dim], (out["raw"][:, j] - mean) / std)
    assert VideoReward.tiny(seed=0).normalization == DEFAULT_NORMALIZATION
    # Casting the module (bf16 on GPU) must not round the statistics: 1.1646 is 1.1640625 in bf16.
    assert reward.to(torch.bfloat16).normalization == norm


def test_output_dim_one_and_reference_switches():
    reward = VideoReward.tiny(seed=0, output_dim=1)
    assert reward.network.rm_head.out_features == 1
    assert reward.score(_videos(2), "a cat")["raw"].shape == (2, 3)
    ref = VideoReward.tiny(seed=0, preprocess=VideoPreprocessConfig(
        min_pixels=3136, sample_all_frames=True, reference_pixel_range=True))
    videos = _videos(1, t=9)
    assert ref.prepare_inputs(videos, "a")["video_grid_thw"][0, 0] == 5  # 9 frames -> 10
    default = VideoReward.tiny(seed=0)
    assert not torch.allclose(ref.score(videos, "a")["raw"], default.score(videos, "a")["raw"])


def test_fallback_chat_format_matches_template(tiny):
    """Without a chat template the built-in Qwen2-VL format gives the same text."""
    template = tiny.tokenizer.chat_template
    try:
        tiny.tokenizer.chat_template = None
        fallback = tiny.build_text("a cat")
    finally:
        tiny.tokenizer.chat_template = template
    assert fallback == tiny.build_text("a cat")


# --------------------------------------------------------------------------------------------------
# LoRA and the released folder
# --------------------------------------------------------------------------------------------------
def test_lora_targets_and_eval():
    reward = VideoReward.tiny(seed=0, lora=True)
    keys = list(reward.model.state_dict())
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys
    assert "base_model.model.rm_head.weight" in keys
    lora = [k for k in keys if "lora_" in k]
    assert lora and not any(s in k for k in lora for s in ("visual", "lm_head", "rm_head", "embed_tokens"))
    assert not any(m.training for m in reward.modules())  # eval after wrapping (peft sets train mode)
    net = VideoRewardModel(tiny_qwen2_vl_config(reward.tokenizer))
    with_vision = find_lora_targets(net, ["lm_head", "rm_head", "embed_tokens"])
    assert any("visual" in n for n in with_vision)
    assert not any("visual" in n for n in find_lora_targets(net, ["lm_head", "rm_head", "embed_tokens", "visual"]))


def _legacy_layout(key):
    """The transformers 4.45 key layout of the released model.pth (the inverse of ``to_current_layout``)."""
    if key.startswith("base_model.model.model.visual."):
        return "base_model.model." + key[len("base_model.model.model."):]
    if key.startswith("base_model.model.model.language_model."):
        return "base_model.model.model." + key[len("base_model.model.model.language_model."):]
    return key


def test_layout_conversion():
    new = [
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "base_model.model.model.language_model.embed_tokens.weight",
        "base_model.model.model.visual.blocks.0.attn.qkv.weight",
        "base_model.model.lm_head.weight",
        "base_model.model.rm_head.weight",
    ]
    old = [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "base_model.model.model.embed_tokens.weight",
        "base_model.model.visual.blocks.0.attn.qkv.weight",
        "base_model.model.lm_head.weight",
        "base_model.model.rm_head.weight",
    ]
    assert [_legacy_layout(k) for k in new] == old
    assert [to_current_layout(k) for k in old] == new
    assert [to_current_layout(k) for k in new] == new


def test_builtin_qwen2_vl_2b_architecture():
    """The built-in architecture used for the released model.pth has Qwen2-VL-2B-Instruct's size."""
    from transformers import Qwen2VLConfig

    with torch.device("meta"):
        net = VideoRewardModel(Qwen2VLConfig(**json.loads(json.dumps(QWEN2_VL_2B_INSTRUCT))), output_dim=1)
    n = sum(p.numel() for p in net.parameters())  # tied lm_head counted once
    assert 2.20e9 < n < 2.22e9, n
    assert net.model.language_model.embed_tokens.weight.shape == (151936, 1536)


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name or "rm_head" in name:  # LoRA B starts at zero: make the adapters matter
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


NORM = {"VQ": (0.5, 2.0), "MQ": (0.1, 0.5), "TA": (-1.0, 3.0)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LoRA reward model with non-trivial adapters, its base config folder, and a released-style folder."""
    root = tmp_path_factory.mktemp("vr")
    tokenizer = VideoReward.tiny().tokenizer
    torch.manual_seed(3)
    net = VideoRewardModel(tiny_qwen2_vl_config(tokenizer)).eval()
    net.config.save_pretrained(root / "tiny-qwen2-vl")  # model_name_or_path: the architecture only
    model = apply_lora(net, TINY_PEFT_CONFIG)
    _randomise(model, 4)
    videos, prompts = _videos(2, seed=7), ["a red car", "a bird in the sky"]
    folder = root / "VideoReward"
    _write_folder(folder, tokenizer, root / "tiny-qwen2-vl", model.state_dict())
    return root, folder, model, tokenizer, videos, prompts


def _write_folder(folder, tokenizer, base_dir, state, output_dim=3):
    """The released layout: model_config.json, checkpoint-N/model.pth (4.45 key layout), checkpoint-N/tokenizer."""
    folder.mkdir(parents=True)
    config = {
        "data_config": {"fps": 2.0, "max_frame_pixels": 200704, "eval_dim": list(EVAL_DIMS),
                        "prompt_template_type": "detailed_special", "sample_type": "uniform"},
        "model_config": {"model_name_or_path": str(base_dir), "output_dim": output_dim, "use_special_tokens": True,
                         "reward_token": "special"},
        "peft_lora_config": TINY_PEFT_CONFIG,
        "inference_config": {f"{d}_{s}": NORM[d][i] for d in EVAL_DIMS for i, s in enumerate(("mean", "std"))},
    }
    (folder / "model_config.json").write_text(json.dumps(config))
    (folder / "checkpoint-2").mkdir()  # an older, empty step: the largest one must be picked
    ckpt_dir = folder / "checkpoint-10"
    ckpt_dir.mkdir()
    tokenizer.save_pretrained(ckpt_dir / "tokenizer")
    torch.save({_legacy_layout(k): v.clone() for k, v in state.items()}, ckpt_dir / "model.pth")


def _in_memory(model, tokenizer, template):
    return VideoReward(model, tokenizer, normalization=NORM, preprocess=VideoPreprocessConfig(),
                       prompt_template=template)


def _assert_same_scores(loaded, videos, prompts, expected):
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not any(m.training for m in loaded.modules())
    got = loaded.score(videos, prompts)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-6)


def test_load_released_folder_with_videoalign_template(trained):
    root, folder, model, tokenizer, videos, prompts = trained
    template = read_prompt_template(FIXTURE_TEMPLATE, "detailed_special")
    loaded = VideoReward.from_pretrained(folder, prompt_template_file=FIXTURE_TEMPLATE, device="cpu")
    assert loaded.prompt_template == template
    assert loaded.normalization == NORM and loaded.preprocess == VideoPreprocessConfig()
    text = loaded.build_text("a red car")
    assert "Three judges look at one generated video." in text and "Prompt - a red car\n" in text
    expected = _in_memory(model, tokenizer, template).score(videos, prompts)
    _assert_same_scores(loaded, videos, prompts, expected)
    # The template reaches the model: our own wording gives other scores for the same weights.
    ours = _in_memory(model, tokenizer, DEFAULT_PROMPT_TEMPLATE).score(videos, prompts)
    assert not torch.allclose(ours["raw"], expected["raw"])


def test_load_without_template_warns_and_honours_fps(trained):
    root, folder, model, tokenizer, videos, prompts = trained
    with pytest.warns(UserWarning, match="not VideoAlign's"):
        loaded = VideoReward.from_pretrained(folder, prompt_template_file=None, device="cpu", fps=4.0)
    assert loaded.prompt_template == DEFAULT_PROMPT_TEMPLATE and loaded.preprocess.fps == 4.0


def test_checkpoint_steps_and_incomplete_folders(trained, tmp_path):
    root, folder, model, tokenizer, videos, prompts = trained
    assert select_checkpoint_dir(folder).name == "checkpoint-10"
    assert select_checkpoint_dir(folder, 2).name == "checkpoint-2"
    with pytest.raises(FileNotFoundError, match="checkpoint-7"):
        select_checkpoint_dir(folder, 7)
    with pytest.raises(FileNotFoundError, match=r"checkpoint-2/model.pth' does not exist; .*incomplete"):
        VideoReward.from_pretrained(folder, prompt_template_file=FIXTURE_TEMPLATE, device="cpu", step=2)
    missing = tmp_path / "checkpoints" / "VideoReward"
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        VideoReward.from_pretrained(missing, prompt_template_file=FIXTURE_TEMPLATE, device="cpu")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(folder, corrupt)
    pth = corrupt / "checkpoint-10" / "model.pth"
    pth.write_bytes(pth.read_bytes()[:1000])  # a truncated download
    with pytest.raises(ValueError) as err:
        VideoReward.from_pretrained(corrupt, prompt_template_file=FIXTURE_TEMPLATE, device="cpu")
    assert str(pth) in str(err.value) and "\n" not in str(err.value)


def test_tied_lm_head_is_not_written_into_the_embedding(tmp_path):
    """Qwen2-VL-2B ties lm_head to the embedding; a file whose lm_head copy differs (unused for rewards)
    must not overwrite the embedding."""
    tokenizer = VideoReward.tiny().tokenizer
    config = tiny_qwen2_vl_config(tokenizer, tie_word_embeddings=True)
    config.save_pretrained(tmp_path / "tied-base")  # model.pth holds all weights: the config suffices
    torch.manual_seed(5)
    net = VideoRewardModel(config).eval()
    assert net.lm_head.weight is net.get_input_embeddings().weight
    model = apply_lora(net, TINY_PEFT_CONFIG)
    _randomise(model, 6)
    videos, prompts = _videos(1, seed=8), ["a tree"]
    template = read_prompt_template(FIXTURE_TEMPLATE, "detailed_special")
    expected = _in_memory(model, tokenizer, template).score(videos, prompts)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["base_model.model.lm_head.weight"] = torch.randn_like(state["base_model.model.lm_head.weight"])
    folder = tmp_path / "VideoReward"
    _write_folder(folder, tokenizer, tmp_path / "tied-base", state)
    with pytest.warns(UserWarning, match="lm_head"):
        loaded = VideoReward.from_pretrained(folder, prompt_template_file=FIXTURE_TEMPLATE, device="cpu")
    _assert_same_scores(loaded, videos, prompts, expected)


# --------------------------------------------------------------------------------------------------
# Building from a config (the trainer's path)
# --------------------------------------------------------------------------------------------------
def test_build_reward_needs_the_template_for_training(trained, tmp_path):
    root, folder, model, tokenizer, videos, prompts = trained
    checkpoint_root = tmp_path / "checkpoints"
    shutil.copytree(folder, checkpoint_root / ckpt.VIDEO_REWARD_DIR)
    cfg = load_config(TINY_CONFIG, [f"checkpoint_root={checkpoint_root}", "model.reward=videoreward",
                                    "training.reward_fps=4.0"])
    with pytest.raises(FileNotFoundError) as err:
        build_reward(cfg)
    message = str(err.value)
    assert "\n" not in message and "download_checkpoints.sh --train" in message
    assert ckpt.VIDEO_REWARD_TEMPLATE_URL in message and ckpt.VIDEOALIGN_COMMIT in message
    with pytest.warns(UserWarning, match="not VideoAlign's"):
        fallback = build_reward(cfg, require_template=False)  # scoring outside training
    assert fallback.prompt_template == DEFAULT_PROMPT_TEMPLATE and fallback.preprocess.fps == 4.0

    shutil.copy(FIXTURE_TEMPLATE, checkpoint_root / ckpt.VIDEO_REWARD_DIR / ckpt.VIDEO_REWARD_TEMPLATE)
    reward = build_reward(cfg)
    assert reward.prompt_template == read_prompt_template(FIXTURE_TEMPLATE, "detailed_special")
    assert reward.preprocess.fps == 4.0  # training.reward_fps reaches the real model
    # 32 frames at 16 fps: 8 frames at 4 fps (temporal grid 4), where the checkpoint's 2 fps gives 4 (grid 2).
    assert reward.prepare_inputs(_videos(1, t=32), "a")["video_grid_thw"][0, 0] == 4

    (checkpoint_root / ckpt.VIDEO_REWARD_DIR / "checkpoint-10" / "model.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.pth' does not exist.*download_checkpoints.sh --train"):
        build_reward(cfg)
