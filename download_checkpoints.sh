#!/usr/bin/env bash
# Download the weights Reward Forcing needs from the Hugging Face Hub, into the folder layout that
# reward_forcing/checkpoints.py expects (its WAN_1_3B_DIR, VIDEO_REWARD_DIR, ... constants).
# Items whose files are already there are skipped, so the script can be re-run after an
# interruption or to add the training assets later.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash download_checkpoints.sh [--train] [--community] [--root DIR] [--prompts-dir DIR]

Inference assets (default):
  Wan-AI/Wan2.1-T2V-1.3B              -> ROOT/Wan2.1-T2V-1.3B        (DiT, VAE, T5, tokenizer)
  JaydenLu666/Reward-Forcing-T2V-1.3B -> ROOT/Reward-Forcing-T2V-1.3B (rewardforcing.pt)

--train also fetches the training assets:
  Wan-AI/Wan2.1-T2V-14B               -> ROOT/Wan2.1-T2V-14B          (teacher, ~70 GB)
  KlingTeam/VideoReward               -> ROOT/VideoReward             (reward model)
  KwaiVGI/VideoAlign prompt_template.py -> ROOT/VideoReward/prompt_template.py
                                      (VideoReward's training prompt; GitHub, pinned commit; curl or wget)
  gdhe17/Self-Forcing checkpoints/ode_init.pt -> ROOT/ode_init.pt     (student initialisation)
  gdhe17/Self-Forcing vidprom_filtered_extended.txt -> PROMPTS/vidprom_filtered_extended.txt

--community also fetches the other releases of the same architecture (configs/community/, docs/community.md):
  gdhe17/Self-Forcing checkpoints/self_forcing_dmd.pt        -> ROOT/community/self_forcing_dmd.pt
  zhuhz22/Causal-Forcing chunkwise/causal_forcing.pt         -> ROOT/community/causal_forcing_chunkwise.pt
  zhuhz22/Causal-Forcing framewise/causal_forcing.pt         -> ROOT/community/causal_forcing_framewise.pt
  Efficient-Large-Model/LongLive-1.3B models/longlive_base.pt -> ROOT/community/longlive_base.pt
  Efficient-Large-Model/LongLive-1.3B models/lora.pt         -> ROOT/community/longlive_lora.pt
  TencentARC/RollingForcing checkpoints/rolling_forcing_dmd.pt -> ROOT/community/rolling_forcing_dmd.pt

Options:
  --root DIR         checkpoint root (default: checkpoints)
  --prompts-dir DIR  where the training prompt list goes (default: prompts)
  --train            also download the training assets
  --community        also download the community checkpoints (about 30 GB)
  -h, --help         show this help

Needs the Hugging Face CLI: pip install -U "huggingface_hub[cli]"  (provides `hf`;
older installs provide `huggingface-cli`, which also works). Gated or private repos need
`hf auth login` first.
EOF
}

ROOT="checkpoints"
PROMPTS_DIR="prompts"
TRAIN=0
COMMUNITY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --train) TRAIN=1; shift ;;
    --community) COMMUNITY=1; shift ;;
    --root) [[ $# -ge 2 ]] || { echo "error: --root needs a folder" >&2; exit 2; }; ROOT="$2"; shift 2 ;;
    --root=*) ROOT="${1#*=}"; shift ;;
    --prompts-dir) [[ $# -ge 2 ]] || { echo "error: --prompts-dir needs a folder" >&2; exit 2; }; PROMPTS_DIR="$2"; shift 2 ;;
    --prompts-dir=*) PROMPTS_DIR="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

# Folder / file names: keep identical to reward_forcing/checkpoints.py.
WAN_1_3B_DIR="Wan2.1-T2V-1.3B"
WAN_14B_DIR="Wan2.1-T2V-14B"
VIDEO_REWARD_DIR="VideoReward"
VIDEO_REWARD_ALIAS="Videoreward"   # the reference README's spelling; accepted if already present
RELEASED_DIR="Reward-Forcing-T2V-1.3B"
RELEASED_FILE="rewardforcing.pt"
ODE_INIT="ode_init.pt"
VIDPROM="vidprom_filtered_extended.txt"
# The prompt VideoReward was trained with is a file of VideoAlign's source, not of the checkpoint; fetched at
# a pinned commit (reward_forcing/checkpoints.py: VIDEO_REWARD_TEMPLATE_URL).
VIDEOALIGN_TEMPLATE="prompt_template.py"
VIDEOALIGN_TEMPLATE_URL="https://raw.githubusercontent.com/KwaiVGI/VideoAlign/219ab9db64c045e5181a2202d11f686439351292/prompt_template.py"
VIDEOALIGN_TEMPLATE_MARKER="DETAILED_PROMPT_WITH_SPECIAL_TOKEN"  # the constant the loader reads

HF_CMD=()
find_cli() {
  # Resolved lazily: a re-run with everything present needs no CLI at all.
  [[ ${#HF_CMD[@]} -gt 0 ]] && return 0
  if command -v hf >/dev/null 2>&1; then
    HF_CMD=(hf download)
  elif command -v huggingface-cli >/dev/null 2>&1; then
    HF_CMD=(huggingface-cli download)
  else
    echo "error: neither 'hf' nor 'huggingface-cli' is on PATH." >&2
    echo "Install the Hugging Face CLI with:  pip install -U \"huggingface_hub[cli]\"" >&2
    exit 1
  fi
}

hf_download() {  # hf_download REPO_ID LOCAL_DIR [FILES...]
  find_cli
  local repo="$1" dir="$2"; shift 2
  mkdir -p "$dir"
  echo "+ ${HF_CMD[*]} $repo${*:+ $*} --local-dir $dir"
  if ! "${HF_CMD[@]}" "$repo" "$@" --local-dir "$dir"; then
    echo "error: downloading $repo failed (network down? gated repo needing \`hf auth login\`?)." >&2
    echo "Re-run the same command to resume; finished items are skipped." >&2
    exit 1
  fi
}

all_exist() {  # all_exist PATH...: true when every path exists
  local p
  for p in "$@"; do [[ -e "$p" ]] || return 1; done
}

# A sharded safetensors folder counts as present only when every shard named in its index exists,
# so an interrupted 14B download is resumed instead of being skipped.
shards_complete() {  # shards_complete DIR
  local index="$1/diffusion_pytorch_model.safetensors.index.json" shard
  [[ -f "$index" ]] || return 1
  for shard in $(grep -o '"[^"]*\.safetensors"' "$index" | tr -d '"' | sort -u); do
    [[ -f "$1/$shard" ]] || return 1
  done
}

fetch_repo() {  # fetch_repo LABEL REPO_ID DEST CHECK...
  local label="$1" repo="$2" dest="$3"; shift 3
  if all_exist "$@"; then
    echo "$label: already present in $dest"
    return 0
  fi
  echo "$label: downloading $repo -> $dest"
  hf_download "$repo" "$dest"
}

# Single files that live in a sub-folder of a repo are downloaded to a staging folder and moved,
# because --local-dir keeps the repo's sub-path (checkpoints/ode_init.pt).
# present_or_stage LABEL SOURCE DEST: says so and fails (status 1) when DEST is already there; else announces the
# download and sets STAGING to DEST's staging name, a hidden sibling (a fixed name, so an interrupted download
# resumes).
present_or_stage() {
  local label="$1" source="$2" dest="$3"
  if [[ -f "$dest" ]]; then
    echo "$label: already present at $dest"
    return 1
  fi
  echo "$label: downloading $source -> $dest"
  mkdir -p "$(dirname "$dest")"
  STAGING="$(dirname "$dest")/.download-$(basename "$dest")"
}

fetch_file() {  # fetch_file LABEL REPO_ID FILE_IN_REPO DEST_FILE
  local label="$1" repo="$2" file="$3" dest="$4" staging
  present_or_stage "$label" "$repo/$file" "$dest" || return 0
  staging="$STAGING"
  hf_download "$repo" "$staging" "$file"
  if [[ ! -f "$staging/$file" ]]; then
    echo "error: the download of $repo/$file finished but $staging/$file is missing" >&2
    exit 1
  fi
  mv "$staging/$file" "$dest"
  rm -rf "$staging"
}

# A plain file from a URL (not the Hub). Written under a hidden staging name and moved into place only when
# complete and recognised, so an interrupted or failed download never leaves a file under the final name.
fetch_url() {  # fetch_url LABEL URL DEST_FILE MUST_CONTAIN
  local label="$1" url="$2" dest="$3" marker="$4" staging cmd
  present_or_stage "$label" "$url" "$dest" || return 0
  staging="$STAGING"
  if command -v curl >/dev/null 2>&1; then
    cmd=(curl -fsSL --retry 3 -o "$staging" "$url")
  elif command -v wget >/dev/null 2>&1; then
    cmd=(wget -q -O "$staging" "$url")
  else
    echo "error: neither curl nor wget is on PATH; download $url to $dest by hand." >&2
    exit 1
  fi
  echo "+ ${cmd[*]}"
  if ! "${cmd[@]}" || ! grep -q "$marker" "$staging"; then
    rm -f "$staging"
    echo "error: downloading $url failed or gave an unexpected file (network down?); re-run, or download it" \
         "to $dest by hand." >&2
    exit 1
  fi
  mv "$staging" "$dest"
}

mkdir -p "$ROOT"

fetch_repo "Wan2.1-T2V-1.3B" "Wan-AI/Wan2.1-T2V-1.3B" "$ROOT/$WAN_1_3B_DIR" \
  "$ROOT/$WAN_1_3B_DIR/config.json" \
  "$ROOT/$WAN_1_3B_DIR/diffusion_pytorch_model.safetensors" \
  "$ROOT/$WAN_1_3B_DIR/Wan2.1_VAE.pth" \
  "$ROOT/$WAN_1_3B_DIR/models_t5_umt5-xxl-enc-bf16.pth" \
  "$ROOT/$WAN_1_3B_DIR/google/umt5-xxl"

fetch_repo "Reward-Forcing-T2V-1.3B" "JaydenLu666/Reward-Forcing-T2V-1.3B" "$ROOT/$RELEASED_DIR" \
  "$ROOT/$RELEASED_DIR/$RELEASED_FILE"

if [[ "$TRAIN" == 1 ]]; then
  if shards_complete "$ROOT/$WAN_14B_DIR" && all_exist "$ROOT/$WAN_14B_DIR/config.json"; then
    echo "Wan2.1-T2V-14B: already present in $ROOT/$WAN_14B_DIR"
  else
    echo "Wan2.1-T2V-14B: downloading Wan-AI/Wan2.1-T2V-14B -> $ROOT/$WAN_14B_DIR (about 70 GB)"
    hf_download "Wan-AI/Wan2.1-T2V-14B" "$ROOT/$WAN_14B_DIR"
  fi

  vr_present() { [[ -f "$1/model_config.json" ]] && compgen -G "$1/checkpoint-*" >/dev/null; }
  vr_dir="$ROOT/$VIDEO_REWARD_DIR"
  if vr_present "$ROOT/$VIDEO_REWARD_DIR"; then
    echo "VideoReward: already present in $ROOT/$VIDEO_REWARD_DIR"
  elif vr_present "$ROOT/$VIDEO_REWARD_ALIAS"; then
    echo "VideoReward: already present in $ROOT/$VIDEO_REWARD_ALIAS (the reference README's spelling; reward_forcing accepts it)"
    vr_dir="$ROOT/$VIDEO_REWARD_ALIAS"
  else
    echo "VideoReward: downloading KlingTeam/VideoReward -> $ROOT/$VIDEO_REWARD_DIR"
    hf_download "KlingTeam/VideoReward" "$ROOT/$VIDEO_REWARD_DIR"
  fi
  fetch_url "VideoAlign prompt template" "$VIDEOALIGN_TEMPLATE_URL" "$vr_dir/$VIDEOALIGN_TEMPLATE" \
    "$VIDEOALIGN_TEMPLATE_MARKER"

  fetch_file "ODE init" "gdhe17/Self-Forcing" "checkpoints/$ODE_INIT" "$ROOT/$ODE_INIT"
  mkdir -p "$PROMPTS_DIR"
  fetch_file "VidProM prompts" "gdhe17/Self-Forcing" "$VIDPROM" "$PROMPTS_DIR/$VIDPROM"
fi

if [[ "$COMMUNITY" == 1 ]]; then
  mkdir -p "$ROOT/community"
  fetch_file "Self Forcing" "gdhe17/Self-Forcing" "checkpoints/self_forcing_dmd.pt" "$ROOT/community/self_forcing_dmd.pt"
  fetch_file "Causal Forcing (chunk-wise)" "zhuhz22/Causal-Forcing" "chunkwise/causal_forcing.pt" \
    "$ROOT/community/causal_forcing_chunkwise.pt"
  fetch_file "Causal Forcing (frame-wise)" "zhuhz22/Causal-Forcing" "framewise/causal_forcing.pt" \
    "$ROOT/community/causal_forcing_framewise.pt"
  fetch_file "LongLive base" "Efficient-Large-Model/LongLive-1.3B" "models/longlive_base.pt" \
    "$ROOT/community/longlive_base.pt"
  fetch_file "LongLive LoRA" "Efficient-Large-Model/LongLive-1.3B" "models/lora.pt" "$ROOT/community/longlive_lora.pt"
  fetch_file "Rolling Forcing" "TencentARC/RollingForcing" "checkpoints/rolling_forcing_dmd.pt" \
    "$ROOT/community/rolling_forcing_dmd.pt"
fi

echo "Done. Checkpoints are in $ROOT/."
if [[ "$TRAIN" != 1 ]]; then
  echo "For training, also run: bash download_checkpoints.sh --train"
fi
