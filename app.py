"""Start KTO Studio: python app.py [--host 127.0.0.1] [--port 7860] [--share] [--auth user:pass]"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="KTO Studio: point-and-click KTO fine-tuning.")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to expose it on your network)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="open a public gradio.live link (off by default)")
    ap.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    ap.add_argument("--config", default=None, help="start from this run config YAML")
    ap.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                    help="let the web UI read data from and export into DIR too (repeatable); by default it reads "
                         "only the studio home, uploads and the bundled sample, and exports under the studio home")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from studio import safepaths
    from studio.config import ConfigError, RunConfig
    from studio.ui.app import CSS, Studio, build_app

    try:
        safepaths.allow(args.allow_path)
    except safepaths.PathRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    auth = None
    if args.auth:
        if ":" not in args.auth:
            print("error: --auth takes USER:PASS", file=sys.stderr)
            return 2
        auth = tuple(args.auth.split(":", 1))
    try:
        cfg = RunConfig.load(args.config) if args.config else RunConfig()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = build_app(Studio(cfg))
    app.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port, share=args.share,
                                                  auth=auth, css=CSS, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
