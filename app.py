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


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def exposure_warning(host: str, share: bool, has_auth: bool) -> str | None:
    """A warning when others can reach the studio without a login: it reads data and trains on this machine."""
    if has_auth:
        return None
    if share:
        where = "a public gradio.live link"
    elif host not in LOOPBACK and not host.startswith("127."):
        where = f"{host} (reachable from other machines)"
    else:
        return None
    return (f"WARNING: the studio is served on {where} without a login: anyone who reaches it can load data, "
            "train and export on this machine. Add --auth USER:PASS, or use --host 127.0.0.1.")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from studio import safepaths
    from studio.config.run import ConfigError, RunConfig
    from studio.ui.app import CSS, I18N, Studio, build_app

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
    if not args.config:  # the defaults are a GPU's: on a CPU start from the CPU plan (minutes, not hours)
        from studio.models import load as models
        from studio.training import plan as planner

        cfg = planner.initial_config(cfg, models.detect_device())
    from studio import paths
    from studio.runs import lock
    from studio.ui.app import other_apps_warning

    # this app is listed first, then the others looked up: two apps started together each see the other
    lock.announce_app(f"http://{args.host}:{args.port}")
    shared = other_apps_warning(lock.other_apps(), paths.home())
    if shared:
        print(f"WARNING: {shared}", file=sys.stderr, flush=True)
    warning = exposure_warning(args.host, args.share, auth is not None)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    from starlette.middleware import Middleware

    from studio.ui.guard import LoginGuard, SecurityHeaders

    # no remote images, no form posting elsewhere (user text is shown escaped too: studio.ui.inert)
    app_kwargs = {"middleware": [Middleware(SecurityHeaders)]}
    if auth:
        # the login page carries no API description, and reset/cancel need the login too
        app_kwargs["middleware"].append(Middleware(LoginGuard))
    app = build_app(Studio(cfg))
    # quiet: Gradio's own start text tells to "set `share=True` in `launch()`"; the studio's flag is --share
    app.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port, share=args.share,
                                                  auth=auth, css=CSS, i18n=I18N, show_error=True,
                                                  app_kwargs=app_kwargs, quiet=True, prevent_thread_lock=True)
    print(start_message(app.local_url, getattr(app, "share_url", None), args.share), flush=True)
    app.block_thread()
    return 0


def start_message(local_url: str, share_url: str | None, share_asked: bool) -> str:
    """Where the studio is served, and how to share it with the studio's own flags."""
    lines = [f"* KTO Studio is running on {local_url}"]
    if share_url:
        lines.append(f"* Public link (for up to a week): {share_url}")
    elif share_asked:
        lines.append("* No public link could be made (no internet, or gradio.live is unreachable)")
    else:
        lines.append("* To open a public link, start it with --share (and --auth USER:PASS for a login)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
