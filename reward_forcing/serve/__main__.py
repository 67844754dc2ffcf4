"""``python -m reward_forcing.serve --config_path configs/tiny.yaml``: serve the live app on 127.0.0.1:7860.

Binds the loopback interface unless ``--host`` is given; then a warning is printed, and ``--token`` (or
``--token auto``) makes every request carry ``?token=...``. Bad input: one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import secrets
import sys
from pathlib import Path

from ..build import build_pipeline, resolve_device, resolve_dtype
from ..config import ConfigError, load_config
from ..extras import MissingExtra, require

log = logging.getLogger("reward_forcing.serve")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m reward_forcing.serve",
                description="Live, steerable video generation in the browser (one session per process).")
    p.add_argument("--config_path", default="configs/reward_forcing.yaml", help="YAML config (see configs/)")
    p.add_argument("--checkpoint_path", default=None,
                   help="generator weights (as for inference.py; default: the config's model.checkpoint)")
    p.add_argument("--use_ema", action="store_true", help="use generator_ema of a trainer checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--token", default=None, help="access token required as ?token=... ('auto': a random one)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--record_dir", default="recordings", help="where recordings are written")
    p.add_argument("--max_prompt_chars", type=int, default=1000)
    p.add_argument("--max_upload_mb", type=float, default=8.0)
    p.add_argument("--queue_blocks", type=int, default=2, help="blocks held for a slow client before dropping")
    p.add_argument("--decoder", default="vae", choices=["vae", "taehv"],
                   help="vae: the Wan VAE (default); taehv: a fast, lower-fidelity preview decoder (--taehv_path)")
    p.add_argument("--taehv_path", default=None, help="TAEHV weights for Wan2.1 (taew2_1.pth or .safetensors)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_args(argv)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        require("app", "the web app")
        from .app import ServeOptions, create_app

        cfg = load_config(args.config_path, list(args.overrides))
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        checkpoint = args.checkpoint_path or cfg.model.checkpoint or None
        if checkpoint is not None and not Path(checkpoint).is_file():
            source = "--checkpoint_path" if args.checkpoint_path else f"model.checkpoint of {args.config_path}"
            raise FileNotFoundError(f"{source}: {checkpoint} does not exist")
        if args.queue_blocks < 1 or args.max_prompt_chars < 1 or args.max_upload_mb <= 0:
            raise ValueError("--queue_blocks, --max_prompt_chars and --max_upload_mb must be positive")
        if (args.decoder == "taehv") != (args.taehv_path is not None):
            raise ValueError("--decoder taehv and --taehv_path FILE go together")
        preview = None
        if args.decoder == "taehv":
            from ..models.taehv import TAEHVDecoder
            preview = TAEHVDecoder.from_file(args.taehv_path, device=device, dtype=dtype)
        pipe = build_pipeline(cfg, checkpoint=checkpoint, use_ema=args.use_ema, device=device,
                              dtype=dtype)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError, MissingExtra) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    token = secrets.token_urlsafe(16) if args.token == "auto" else args.token
    if not _is_loopback(args.host):
        print(f"warning: serving on {args.host}: anyone who can reach this port can use the GPU"
              + ("" if token else "; consider --token auto"), file=sys.stderr)
    options = ServeOptions(height=cfg.video.height, width=cfg.video.width, fps=cfg.video.fps,
                           display_scale=cfg.video.display_scale, token=token,
                           record_dir=Path(args.record_dir), max_prompt_chars=args.max_prompt_chars,
                           start_prompt=cfg.text.start_prompt,
                           max_upload_bytes=int(args.max_upload_mb * 2**20), queue_blocks=args.queue_blocks,
                           decoder_model=preview)
    import uvicorn

    url = f"http://{args.host}:{args.port}/" + (f"?token={token}" if token else "")
    log.info("open %s", url)
    uvicorn.run(create_app(pipe, options), host=args.host, port=args.port, log_level="warning",
                ws_max_size=4 * options.max_upload_bytes)  # larger uploads get an error event, far larger a close
    return 0


if __name__ == "__main__":
    sys.exit(main())
