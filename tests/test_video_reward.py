"""VideoReward: preprocessing parity with transformers' Qwen2-VL processor, batched frozen scoring,
normalisation, the reference switches, and loading every checkpoint layout (tiny random models)."""
import json

import numpy as np
import pytest
import torch

from reward_forcing.models.video_reward import (
    CLIP_MEAN, CLIP_STD, DEFAULT_NORMALIZATION, EVAL_DIMS, TINY_PEFT_CONFIG, VideoPreprocessConfig, VideoReward,
    VideoRewardModel, apply_lora, find_lora_targets, patchify_video, preprocess_video, sample_frame_indices,
    select_checkpoint_dir, smart_resize, tiny_qwen2_vl_config, to_current_layout, to_legacy_layout,
)

H, W = 56, 84  # a multiple of 28 on both sides: 4x6 patches, 6 merged tokens per temporal patch


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
    assert (ours - ref).abs().max().item() <= 1e-6

    # The full pipeline from the project's [-1, 1] convention (one frame, padded to two).
    video = (x * 2 - 1)[None]
    full, grid2 = preprocess_video(video, VideoPreprocessConfig(min_pixels=28 * 28))
    assert grid2 == grid
    assert (full - ref).abs().max().item() <= 1e-6


def test_pixel_range_default_vs_reference():
    video = torch.full((4, 3, H, W), -1.0)
    expect = {False: 0.0, True: -1.0}  # correct [0, 1] range vs the reference's [-1, 1]
    for reference, pixel in expect.items():
        patches, _ = preprocess_video(video, VideoPreprocessConfig(min_pixels=3136, reference_pixel_range=reference))
        per_channel = patches.view(patches.shape[0], 3, -1)
        for c in range(3):
            want = (pixel - CLIP_MEAN[c]) / CLIP_STD[c]
            assert torch.allclose(per_channel[:, c], torch.full_like(per_channel[:, c], want), atol=1e-6)
    a, _ = preprocess_video(video * 0.3, VideoPreprocessConfig(min_pixels=3136))
    b, _ = preprocess_video(video * 0.3, VideoPreprocessConfig(min_pixels=3136, reference_pixel_range=True))
    assert not torch.allclose(a, b)


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
    default = VideoReward.tiny(seed=0)
    assert default.norm_mean.tolist() == pytest.approx([DEFAULT_NORMALIZATION[d][0] for d in EVAL_DIMS])
    assert default.norm_std.tolist() == pytest.approx([DEFAULT_NORMALIZATION[d][1] for d in EVAL_DIMS])


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


# --------------------------------------------------------------------------------------------------
# LoRA and checkpoints
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
    assert [to_legacy_layout(k) for k in new] == old
    assert [to_current_layout(k) for k in old] == new
    assert [to_current_layout(k) for k in new] == new


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name or "rm_head" in name:  # LoRA B starts at zero: make the adapters matter
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LoRA reward model with non-trivial adapters, plus its base model folder on disk."""
    root = tmp_path_factory.mktemp("vr")
    tokenizer = VideoReward.tiny().tokenizer
    torch.manual_seed(3)
    net = VideoRewardModel(tiny_qwen2_vl_config(tokenizer)).eval()
    net.save_pretrained(root / "tiny-qwen2-vl")  # the "base model" (model_name_or_path)
    model = apply_lora(net, TINY_PEFT_CONFIG)
    _randomise(model, 4)
    norm = {"VQ": (0.5, 2.0), "MQ": (0.1, 0.5), "TA": (-1.0, 3.0)}
    pre = VideoPreprocessConfig(min_pixels=3136)
    reward = VideoReward(model, tokenizer, normalization=norm, preprocess=pre)
    videos, prompts = _videos(2, seed=7), ["a red car", "a bird in the sky"]
    return root, reward, videos, prompts, reward.score(videos, prompts)


def _write_folder(folder, reward, base_dir, files):
    folder.mkdir(parents=True)
    config = {
        "data_config": {"fps": 2.0, "max_frame_pixels": 200704, "min_pixels": 3136, "eval_dim": list(EVAL_DIMS),
                        "prompt_template_type": "detailed_special"},
        "model_config": {"model_name_or_path": str(base_dir), "output_dim": 3, "use_special_tokens": True,
                         "reward_token": "special"},
        "peft_lora_config": TINY_PEFT_CONFIG,
        "inference_config": {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": 0.1, "MQ_std": 0.5,
                             "TA_mean": -1.0, "TA_std": 3.0},
    }
    (folder / "model_config.json").write_text(json.dumps(config))
    (folder / "checkpoint-2").mkdir()  # an older, empty step: the largest one must be picked
    ckpt = folder / "checkpoint-10"
    ckpt.mkdir()
    reward.tokenizer.save_pretrained(ckpt / "tokenizer")
    for name, obj in files.items():
        if name.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(obj, str(ckpt / name))
        else:
            torch.save(obj, ckpt / name)


def _assert_same_scores(folder, videos, prompts, expected):
    loaded = VideoReward.from_pretrained(folder, device="cpu")
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not any(m.training for m in loaded.modules())
    got = loaded.score(videos, prompts)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-6)
    return loaded


@pytest.mark.parametrize("layout", ["new", "legacy"])
def test_load_model_pth(trained, layout):
    root, reward, videos, prompts, expected = trained
    state = {k: v.clone() for k, v in reward.model.state_dict().items()}
    if layout == "legacy":
        state = {to_legacy_layout(k): v for k, v in state.items()}
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in state
        assert any(k.startswith("base_model.model.visual.") for k in state)
    folder = root / f"VideoReward-{layout}"
    _write_folder(folder, reward, "tiny-qwen2-vl", {"model.pth": state})  # relative name, next to the folder
    (folder / "tiny-qwen2-vl").symlink_to(root / "tiny-qwen2-vl")
    _assert_same_scores(folder, videos, prompts, expected)


def test_load_adapter_and_non_lora(trained):
    from peft import get_peft_model_state_dict

    root, reward, videos, prompts, expected = trained
    adapter = {to_legacy_layout(k): v.clone() for k, v in get_peft_model_state_dict(reward.model).items()}
    assert adapter and all(".default." not in k for k in adapter)
    non_lora = {"base_model.model.rm_head.weight": reward.model.state_dict()["base_model.model.rm_head.weight"]}
    folder = root / "VideoReward-adapter"
    _write_folder(folder, reward, root / "tiny-qwen2-vl",
                  {"adapter_model.safetensors": adapter, "non_lora_state_dict.pth": non_lora})
    loaded = _assert_same_scores(folder, videos, prompts, expected)
    assert loaded.norm_mean.tolist() == pytest.approx([0.5, 0.1, -1.0])


def test_checkpoint_root_and_step(trained, tmp_path):
    root, reward, videos, prompts, expected = trained
    folder = tmp_path / "VideoReward"
    _write_folder(folder, reward, root / "tiny-qwen2-vl", {"model.pth": dict(reward.model.state_dict())})
    assert select_checkpoint_dir(folder).name == "checkpoint-10"
    assert select_checkpoint_dir(folder, 2).name == "checkpoint-2"
    with pytest.raises(FileNotFoundError, match="checkpoint-7"):
        select_checkpoint_dir(folder, 7)
    # The checkpoint root (holding VideoReward/) is accepted too.
    _assert_same_scores(tmp_path, videos, prompts, expected)
    with pytest.raises(FileNotFoundError, match="download_checkpoints.sh --train"):
        VideoReward.from_pretrained(folder, device="cpu", step=2)  # empty checkpoint-2


def test_missing_folder_message(tmp_path):
    missing = tmp_path / "checkpoints" / "VideoReward"
    with pytest.raises(FileNotFoundError) as err:
        VideoReward.from_pretrained(missing, device="cpu")
    assert str(missing) in str(err.value) and "download_checkpoints.sh --train" in str(err.value)
    folder = tmp_path / "only"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        VideoReward.from_pretrained(folder, device="cpu")


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
    reward = VideoReward(model, tokenizer, preprocess=VideoPreprocessConfig(min_pixels=3136),
                         normalization={"VQ": (0.5, 2.0), "MQ": (0.1, 0.5), "TA": (-1.0, 3.0)})
    videos, prompts = _videos(1, seed=8), ["a tree"]
    expected = reward.score(videos, prompts)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["base_model.model.lm_head.weight"] = torch.randn_like(state["base_model.model.lm_head.weight"])
    folder = tmp_path / "VideoReward"
    _write_folder(folder, reward, tmp_path / "tied-base", {"model.pth": state})
    with pytest.warns(UserWarning, match="lm_head"):
        _assert_same_scores(folder, videos, prompts, expected)


def test_fallback_chat_format_matches_template(tiny):
    """Without a chat template the built-in Qwen2-VL format gives the same text."""
    template = tiny.tokenizer.chat_template
    try:
        tiny.tokenizer.chat_template = None
        fallback = tiny.build_text("a cat")
    finally:
        tiny.tokenizer.chat_template = template
    assert fallback == tiny.build_text("a cat")
