"""The command line: `vramancer` (the dashboard), `devices`, `plan`, `generate`, `bench`, `node`, `serve`.

Flags come first; `VRM_*` environment variables supply their defaults. Bad input is one
sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys

EXIT_USAGE = 2
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_CONNECTIONS = 1024
MAX_BATCH = 256  # past this a batch's padded KV outgrows any context worth serving
# A connection's deadlines: flag -> (VRM_ name, default seconds, what it bounds). The defaults
# let a slow client on a slow link through and close what an idle or stalled one holds.
DEADLINES = {
    "--keep-alive-seconds": ("KEEP_ALIVE_SECONDS", 5.0, "how long an idle connection stays open between requests"),
    "--header-seconds": ("HEADER_SECONDS", 10.0, "how long a client may take to send a request's headers"),
    "--body-seconds": ("BODY_SECONDS", 30.0, "how long a client may take to send a request's body"),
}
MAX_DEADLINE_S = 3600.0
DEFAULT_DRAIN_S = 5.0  # running answers get this long to finish after a stop signal
MAX_DRAIN_S = 600.0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not the whole usage block; flags are never
    abbreviated (`--api-key X` would otherwise be taken for `--api-key-file X`); and what was
    not understood is named by its flags only, since a stray value may be a secret."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        from vramancer.config.validation import decimal_number, whole_number

        # type=int / type=float read ASCII digits only (int() also reads '٢' and '1_0').
        self.register("type", int, whole_number)
        self.register("type", float, decimal_number)
        self._given: set[str] = set()

    def add_argument(self, *args, **kwargs):
        """A flag that takes one value or is a switch may be given once: the last would win silently."""
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and not isinstance(action, _REPEATABLE):
            action.__class__ = _given_once(type(action))
        return action

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._given = set()
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        known, extras = self.parse_known_args(args, namespace)
        if extras:
            flags = [arg.split("=", 1)[0] for arg in extras if arg.startswith("-")]
            if "--api-key" in flags:
                self.error("there is no --api-key flag (a key on the command line shows in `ps`); put the key "
                           "in a file and pass --api-key-file FILE")
            if flags:
                self.error(f"unknown flag{'s' if len(flags) > 1 else ''} {' '.join(flags)}")
            self.error(f"{len(extras)} unexpected argument{'s' if len(extras) > 1 else ''} (not shown)")
        return known

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message}; see `{self.prog} --help`.\n")


_REPEATABLE = (argparse._AppendAction, argparse._CountAction, argparse._HelpAction, argparse._VersionAction)


def _given_once(kind: type) -> type:
    """`kind` of argparse action, refusing a second use of its flag (or of another spelling of it)."""
    class GivenOnce(kind):
        def __call__(self, parser, namespace, values, option_string=None):
            given = getattr(parser, "_given", set())
            if self.dest in given:
                parser.error(f"{'/'.join(self.option_strings)} is given twice; give it once")
            given.add(self.dest)
            super().__call__(parser, namespace, values, option_string)

    GivenOnce.__name__ = kind.__name__
    return GivenOnce


def _env_list(name: str) -> list[str]:
    """A comma-separated VRM_<name> (or config file list), as the starting list of a repeatable flag."""
    return [item.strip() for item in _env(name, "").split(",") if item.strip()]


def _env(name: str, default: str) -> str:
    """A text default from VRM_<name>, else the config file; numeric defaults are read (and
    checked) after parsing."""
    from vramancer.config.validation import env_text

    return env_text(name, default)


def _add_load_flags(parser: argparse.ArgumentParser, model: bool = True, inherit: bool = False) -> None:
    """The flags that choose what to load and where. On a subcommand (`inherit`), a flag left
    out keeps what was given before the subcommand: `vramancer --devices X plan` means X."""
    add_argument = parser.add_argument
    if inherit:
        def add_argument(*names, **options):
            return parser.add_argument(*names, **{**options, "default": argparse.SUPPRESS})

    if model:
        add_argument("--model", default=_env("MODEL", "default"),
                     help="default (bundled SmolLM2-135M-Instruct), a model folder, a .gguf file or a hub id")
    add_argument("--devices", default=_env("DEVICES", "auto"),
                 help="auto | cuda:0=10GiB,cpu | mps,cpu | sim:3x2GiB | sim:4GiB,1GiB, plus remote devices "
                      "node:HOST:PORT/DEVICE (e.g. cpu,node:127.0.0.1:7070/sim0)")
    add_argument("--discover", action="store_true", default=_env("DISCOVER", "") == "1",
                 help="also use every device of the nodes zeroconf finds (on VRM_DISCOVER_BIND, default 127.0.0.1)")
    add_argument("--token-file", default=_env("TOKEN_FILE", "") or None,
                 help="file holding the cluster token for remote devices (default: VRM_CLUSTER_TOKEN)")
    add_argument("--strategy", default=_env("STRATEGY", "proportional"), help="proportional | sequential | profiled")
    add_argument("--context", type=int, default=None,
                 help="tokens of KV cache to budget for (default 2048)")
    add_argument("--dtype", default=_env("DTYPE", "auto"), choices=["auto", "float32", "float16", "bfloat16"],
                 help="auto: float32 on CPU and simulated devices (bfloat16 where torchao's kernels run "
                      "quantized weights), the GPU's half type on GPUs; never chosen by a timing")
    add_argument("--weights", default=_env("WEIGHTS", "auto"),
                 help="auto (a GGUF keeps the width it was stored at, any other checkpoint its dtype) | native "
                      "(the dtype) | q8 (int8) | q4 (4-bit, CPU and sim devices): weights stay quantized on every device")
    add_argument("--reprofile", action="store_true", help="measure device and link timings afresh")
    add_argument("--threads", type=int, default=None,
                 help="CPU threads for torch (default: one less than the cores, so the rest of the "
                      "program, the dashboard's UI above all, keeps a core)")
    add_argument("--auto-rebalance", action="store_true", default=_env("AUTO_REBALANCE", "") == "1",
                 help="move layers off a device by themselves when something else takes its memory")
    add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                 help="replay each CUDA layer's decode step from a CUDA graph, recorded at the first decode step "
                      "(the KV cache is then allocated for the whole context at once). Left out (or "
                      "VRM_CUDA_GRAPHS=auto): on wherever there is a CUDA device and the model allows it")
    add_argument("--host-tier", default=None, metavar="SIZE",
                 help="host memory that may hold the weights of layers no device has room for; they stream "
                      "to the device that runs them at their turn (default VRM_HOST_TIER, else none)")
    add_argument("--disk-tier", default=None, metavar="SIZE",
                 help="disk space (the cache folder) that may hold such weights, memory-mapped, once the host "
                      "tier is full (default VRM_DISK_TIER, else none)")


def _add_serve_flags(parser: argparse.ArgumentParser, inherit: bool = False) -> None:
    """The server's flags, for `serve` and for the dashboard's `--serve` alike; on `serve`
    (`inherit`) a flag left out keeps what was given before the subcommand."""
    add_argument = parser.add_argument
    if inherit:
        def add_argument(*names, **options):
            return parser.add_argument(*names, **{**options, "default": argparse.SUPPRESS})

    add_argument("--api-key-file", default=_env("API_KEY_FILE", "") or None,
                 help="file holding the key clients must send as 'Authorization: Bearer KEY'")
    add_argument("--max-batch", type=int, default=None,
                 help=f"sequences decoded together at most (default {DEFAULT_MAX_BATCH})")
    add_argument("--cors-origin", action="append", default=_env_list("CORS_ORIGINS"), metavar="ORIGIN",
                 help="a web page origin (https://chat.example) whose scripts may call the API; repeat "
                      "for more; none by default")
    add_argument("--allow-host", action="append", default=_env_list("ALLOW_HOSTS"), metavar="NAME",
                 help="a Host name clients may use besides loopback names and --host (guards against DNS "
                      "rebinding); repeat for more; '*' allows any")
    add_argument("--max-connections", type=int, default=None,
                 help=f"open connections at most; more are refused at once (default {DEFAULT_MAX_CONNECTIONS})")
    for flag, (_, default, what) in DEADLINES.items():
        add_argument(flag, type=float, default=None, metavar="SECONDS", help=f"{what} (default {default:g})")


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vramancer", description="Split one language model across several devices and steer it live.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_load_flags(parser)
    parser.add_argument("--serve", nargs="?", type=int, const=DEFAULT_PORT, default=None, metavar="PORT",
                        help=f"also serve the OpenAI-compatible API on 127.0.0.1:PORT (default {DEFAULT_PORT}) "
                             "from the dashboard's engine, with the serve flags below")
    _add_serve_flags(parser)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    devices = sub.add_parser("devices", help="list the devices a spec resolves to (and the nodes found)")
    devices.add_argument("--devices", default=_env("DEVICES", "auto"))
    devices.add_argument("--discover", action="store_true",
                         help="list the vramancer nodes zeroconf finds, with their devices")
    devices.add_argument("--discover-bind", default=_env("DISCOVER_BIND", "127.0.0.1"),
                         help="the address to look for nodes on (default 127.0.0.1; 0.0.0.0 for every interface)")
    devices.add_argument("--discover-seconds", type=float, default=None,
                         help="how long to listen for nodes (default 3)")
    devices.add_argument("--token-file", default=_env("TOKEN_FILE", "") or None,
                         help="file holding the cluster token, for remote devices named in --devices")
    devices.add_argument("--json", action="store_true")

    node = sub.add_parser("node", help="serve this machine's devices to a coordinator")
    node.add_argument("--devices", default=_env("NODE_DEVICES", "auto"),
                      help="the devices to serve: auto (every accelerator, else cpu) | cuda:0,cuda:1 | sim:2x1GiB")
    node.add_argument("--port", type=int, default=None,
                      help="port to listen on (default 7070; 0 picks a free one)")
    node.add_argument("--bind", default=_env("NODE_BIND", "127.0.0.1"),
                      help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    node.add_argument("--token-file", default=_env("TOKEN_FILE", "") or None,
                      help="file holding the cluster token (default: VRM_CLUSTER_TOKEN)")
    node.add_argument("--no-advertise", action="store_true", help="do not announce this node with zeroconf")
    node.add_argument("--lease", type=float, default=None, metavar="SECONDS",
                      help="let a coordinator go (and free what it held) after this long without a word from it "
                           "(default 30; VRM_NODE_LEASE)")

    plan = sub.add_parser("plan", help="show how the model would be split, without loading weights")
    _add_load_flags(plan, inherit=True)
    plan.add_argument("--json", action="store_true")

    generate = sub.add_parser("generate", help="load, split and generate; text streams to stdout")
    _add_load_flags(generate, inherit=True)
    generate.add_argument("--prompt", required=True)
    _add_sampling_flags(generate)
    generate.add_argument("--migrate", action="append", default=[], metavar="A-B:DEVICE@STEP",
                          help="after STEP new tokens, move layers A-B (or embed/head) to DEVICE; repeatable")
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (and /metrics) for the split model")
    _add_load_flags(serve, inherit=True)
    serve.add_argument("--host", default=_env("HOST", "127.0.0.1"),
                       help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface: give a key)")
    serve.add_argument("--port", type=int, default=None, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    _add_serve_flags(serve, inherit=True)
    serve.add_argument("--drain-seconds", type=float, default=None,
                       help=f"on SIGTERM, SIGINT or SIGHUP: new requests are refused (503) and running ones get "
                            f"this long to finish before they are ended (default {DEFAULT_DRAIN_S:g}, 0 to "
                            f"{MAX_DRAIN_S:g})")

    config = sub.add_parser("config", help="print every setting's value and where it came from "
                                           "(flag > VRM_* variable > config file > default)")
    config.add_argument("--json", action="store_true")

    bench = sub.add_parser("bench", help="decode speed and time to first token over a few rounds")
    _add_load_flags(bench, inherit=True)
    bench.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    bench.add_argument("--max-new-tokens", type=int, default=64)
    bench.add_argument("--rounds", type=int, default=3)
    bench.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    from vramancer.config.errors import VramancerError

    try:  # the parser's defaults come from VRM_* and the config file, which may be wrong
        args = build_parser().parse_args(argv)
    except VramancerError as exc:
        print(f"vramancer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        _check_values(args)  # before torch is even imported: a wrong value costs no time
        # On a small machine torch's default (every core) fights the threads that stream, sample
        # telemetry and draw the screen; one core less decodes as fast and keeps the rest responsive.
        threads = args.threads or max(1, (os.cpu_count() or 2) - 1)

        def prepare() -> None:
            _quiet_libraries()
            _set_threads(threads)

        if args.command is None:
            return _dashboard(args, prepare)  # it runs `prepare` after its first frame, torch after that
        if args.command == "serve":
            return _serve(args, prepare)  # it listens first: a busy port costs no torch import
        prepare()  # imports torch: a signal during that import ends the process as it would have
        if args.command in ("plan", "generate", "bench", "devices"):  # serve and node end in their own ways
            _stop_on_signals()
        return {"config": _config, "devices": _devices, "plan": _plan, "generate": _generate, "bench": _bench,
                "node": _node, "serve": _serve}[args.command](args)
    except VramancerError as exc:
        print(f"vramancer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except _Stopped as stop:
        print(f"vramancer: stopped by {signal.Signals(stop.signum).name}.", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("vramancer: interrupted.", file=sys.stderr)
        return 130
    except MemoryError:
        print("vramancer: this process ran out of memory; free some, use a smaller model, --weights q8 or q4, "
              "or a smaller --context.", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`vramancer plan | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, as Ctrl-C is."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_on_signals() -> None:
    """End on SIGTERM and SIGHUP as on Ctrl-C, by an exception: every `finally` on the way
    runs (a cache piece or a kernel build being written removes its temporary folder), and the
    program says one line. The default action would end the process where it stands. Set once
    torch is imported: an exception raised inside the import of a C extension can leave it half
    made, and its teardown at exit then aborts."""
    def stop(signum, frame):
        raise _Stopped(signum)

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)


def _check_values(args) -> None:
    """Fill the numeric defaults from VRM_* and refuse any value that is wrong on its own,
    before anything loads: one sentence for a flag and for its environment variable alike."""
    from vramancer.config import settings
    from vramancer.config import validation as v
    from vramancer.config.errors import VramancerError

    env_defaults = {"context": ("CONTEXT", 2048), "threads": ("THREADS", 0)}
    if args.command == "node":
        env_defaults["port"] = ("NODE_PORT", 7070)
    serving = args.command == "serve" or (args.command is None and args.serve is not None)
    if args.command == "serve":
        env_defaults["port"] = ("PORT", DEFAULT_PORT)
    if serving:
        env_defaults["max_batch"] = ("MAX_BATCH", DEFAULT_MAX_BATCH)
        env_defaults["max_connections"] = ("MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS)
    for dest, (name, default) in env_defaults.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, v.env_int(name, default))
    if serving:
        for flag, (name, default, _) in DEADLINES.items():
            dest = flag[2:].replace("-", "_")
            if getattr(args, dest, None) is None:
                setattr(args, dest, v.env_float(name, default))
            if not 0 < v.finite(flag, getattr(args, dest)) <= MAX_DEADLINE_S:
                raise VramancerError(f"{flag} must be more than 0 and at most {MAX_DEADLINE_S:g}, "
                                     f"not {getattr(args, dest):g}.")
    discover_source = "--discover-seconds"
    if args.command == "devices" and args.discover_seconds is None:
        args.discover_seconds = v.env_float("DISCOVER_SECONDS", 3.0)
        discover_source = settings.where("discover_seconds")
    v.check_threads(args.threads)
    v.check_context(args.context)
    if getattr(args, "weights", None) is not None:
        v.check_weights(args.weights)
    for tier in ("host", "disk"):  # the flag, else VRM_<TIER>_TIER or the config key, as a checked size
        if hasattr(args, f"{tier}_tier"):
            from vramancer.config import settings
            from vramancer.config.tiers import tier_setting

            given = getattr(args, f"{tier}_tier")
            tier_setting(tier, given)
            setattr(args, f"{tier}_tier", given if given is not None else settings.value(f"{tier}_tier"))
    if hasattr(args, "cuda_graphs"):  # the flag as on/off, else VRM_CUDA_GRAPHS (auto, on, off)
        args.cuda_graphs = {True: "on", False: "off"}.get(args.cuda_graphs) or v.env_cuda_graphs()
    if args.command in ("node", "serve"):
        v.check_port("--port", args.port)
    if args.command == "node":
        if args.lease is None:
            args.lease = v.env_float("NODE_LEASE", 30.0)
        if not 1.0 <= v.finite("--lease", args.lease) <= 3600.0:
            raise VramancerError(f"--lease must be between 1 and 3600 seconds, not {args.lease:g}.")
    if args.command is None and args.serve is not None:
        v.check_port("--serve", args.serve)
    if serving:
        if not 1 <= args.max_batch <= MAX_BATCH:
            raise VramancerError(f"--max-batch must be between 1 and {MAX_BATCH}, not {args.max_batch}.")
        if args.max_connections < 1:
            raise VramancerError(f"--max-connections must be at least 1, not {args.max_connections}.")
        if args.command == "serve" and args.drain_seconds is None:
            args.drain_seconds = v.env_float("DRAIN_SECONDS", DEFAULT_DRAIN_S)
        if args.command == "serve" and not 0 <= v.finite("--drain-seconds", args.drain_seconds) <= MAX_DRAIN_S:
            raise VramancerError(f"--drain-seconds must be between 0 and {MAX_DRAIN_S:g}, not {args.drain_seconds:g}.")
        from vramancer.server.guard import check_origin

        for origin in args.cors_origin:
            check_origin(origin)
        from vramancer.server.access import read_api_key

        args.api_key = read_api_key(args.api_key_file) if args.api_key_file else None
    if getattr(args, "token_file", None):
        v.read_token_file(args.token_file)  # a bad token file is refused before torch loads
    if args.command == "devices":
        v.check_discover_seconds(args.discover_seconds, discover_source)
    for flag in ("prompt", "model", "devices"):
        text = getattr(args, flag, None)
        if isinstance(text, str):
            v.check_text(f"--{flag}", text)
    if args.command == "generate":
        v.check_prompt(args.prompt, args.raw)
        v.check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed,
                         args.repetition_penalty)
    elif args.command == "bench":
        v.check_prompt(args.prompt, raw=False)
        if args.max_new_tokens < 2:  # decode speed is timed from the second token on
            raise VramancerError(f"bench --max-new-tokens must be at least 2 (decode speed is timed between "
                                 f"tokens), not {args.max_new_tokens}.")
        if args.rounds < 1:
            raise VramancerError(f"--rounds must be at least 1, not {args.rounds}.")
    if args.command in (None, "plan", "generate", "bench", "devices", "serve"):
        from vramancer.config.device_spec import (
            parse_device_spec,  # no torch: a bad spec costs no time
        )

        if parse_device_spec(_device_text(args)).discover:  # discovery's deadline, checked before it starts
            v.check_discover_seconds(v.env_float("DISCOVER_SECONDS", 3.0), settings.where("discover_seconds"))
    if args.command in (None, "plan", "generate", "bench", "serve"):
        from vramancer.config.paths import check_cache_root

        check_cache_root()  # profiles, kernels and the weights cache live there


# --- commands --------------------------------------------------------------------------


def _devices(args) -> int:
    from vramancer.config.device_spec import DeviceSpec, parse_device_spec
    from vramancer.engine.factory import open_devices
    from vramancer.platforms.devices import close_devices

    spec = parse_device_spec(args.devices)
    if spec.discover:
        spec = DeviceSpec(spec.requests, spec.auto, spec.remotes)  # `devices` lists found nodes, it does not join them
    if spec.auto:
        spec = DeviceSpec(parse_device_spec("cpu").requests, False, spec.remotes) if not _has_accelerator() else spec
    nodes = _discover_nodes(args) if (args.discover or parse_device_spec(args.devices).discover) else None
    devices = open_devices(spec, token_file=args.token_file)
    try:
        rows = [d.to_json() for d in devices]
    finally:
        close_devices(devices)
    if args.json:
        out = {"devices": rows, "accelerators_found": _has_accelerator()}
        if nodes is not None:
            out["nodes"] = [{"node": n.label, "host": n.host, "port": n.port,
                             "devices": [{"name": f"{n.label}/{name}", "size": size} for name, size in n.devices]}
                            for n in nodes]
        print(json.dumps(out, indent=2))
        return 0
    from vramancer.config.units import format_bytes

    if not _has_accelerator() and args.devices in ("", "auto"):
        print("No accelerator found: `auto` will use a simulated pool of two devices sized to the model.")
    width = max([8] + [len(row["name"]) for row in rows])
    for row in rows:
        tag = " (simulated)" if row["simulated"] else ""
        print(f"{row['name']:<{width}} {row['label']}{tag}: {format_bytes(row['free_bytes'])} free of {format_bytes(row['total_bytes'])}")
    if nodes is not None:
        if not nodes:
            print(f"No vramancer node answered on {args.discover_bind} within {args.discover_seconds:g} s.")
        for n in nodes:
            shown = ", ".join(f"{n.label}/{name} ({size})" for name, size in n.devices) or "no devices"
            print(f"{n.label}: {shown}")
    return 0


def _discover_nodes(args):
    from vramancer.config.errors import VramancerError
    from vramancer.engine.factory import discover_nodes

    if args.discover_seconds <= 0:
        raise VramancerError(f"--discover-seconds must be positive, not {args.discover_seconds:g}.")
    return discover_nodes(args.discover_seconds, args.discover_bind)


def _node(args) -> int:
    import logging

    from vramancer.engine.factory import serve_node
    from vramancer.platforms.lifetime import exit_now

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vramancer node: %(message)s"))
    node_log = logging.getLogger("vramancer.node")
    node_log.addHandler(handler)
    node_log.setLevel(logging.INFO)
    node_log.propagate = False
    status = serve_node(args.devices, args.bind, args.port, args.token_file, advertise=not args.no_advertise,
                        ready=lambda line: print(line, flush=True), lease_s=args.lease)
    exit_now(status)  # stopped and withdrawn: skip seconds of interpreter teardown


def _serve(args, prepare) -> int:
    from vramancer.platforms.lifetime import exit_now
    from vramancer.server.access import is_loopback, listen

    if not is_loopback(args.host) and args.api_key is None:
        print(f"vramancer: warning: serving on {args.host} without --api-key-file; anyone who can reach this "
              "machine can use the model.", file=sys.stderr, flush=True)
    sock = listen(args.host, args.port)  # a busy port is refused before torch is imported
    prepare()
    from vramancer.server.service import run_serve

    status = run_serve(_load_options(args), sock, args.host, args.api_key, args.max_batch,
                       ready=lambda line: print(line, flush=True), cors_origins=tuple(args.cors_origin),
                       allowed_hosts=tuple(args.allow_host), limits=_limits(args),
                       drain_s=args.drain_seconds)
    exit_now(status)  # stopped: skip seconds of interpreter teardown


def _limits(args):
    """The connection cap and deadlines the flags (or VRM_*, or the config file) set."""
    from vramancer.server.connections import Limits

    return Limits(max_connections=args.max_connections, keep_alive_s=args.keep_alive_seconds,
                  header_s=args.header_seconds, body_s=args.body_seconds)


def _config(args) -> int:
    """`vramancer config`: each setting's effective value and its source, without torch."""
    from vramancer.config.settings import config_path, every_setting

    path = config_path()
    found = every_setting()
    if args.json:
        print(json.dumps({"config_file": str(path), "config_file_exists": path.is_file(),
                          "settings": {s.name: {"value": s.value, "source": s.source} for s in found}}, indent=2))
        return 0
    print(f"config file: {path}{'' if path.is_file() else ' (none)'}")
    width = max(len(s.name) for s in found)
    for setting in found:
        print(f"  {setting.name:<{width}}  {setting.value or '-':<24} {setting.source}")
    return 0


def _device_text(args) -> str:
    """--devices, with `discover` added for --discover."""
    return f"{args.devices},discover" if getattr(args, "discover", False) else args.devices


def _load_options(args):
    """The one LoadOptions every command that loads a model builds from its flags."""
    from vramancer.config.options import LoadOptions

    return LoadOptions(args.model, _device_text(args), args.strategy, args.context, args.dtype,
                       auto_rebalance=getattr(args, "auto_rebalance", False), token_file=args.token_file,
                       weights=args.weights, cuda_graphs=args.cuda_graphs,
                       host_tier=getattr(args, "host_tier", None) or "", disk_tier=getattr(args, "disk_tier", None) or "")


def _plan(args) -> int:
    from vramancer.config.units import format_bytes
    from vramancer.engine.loader import prepare
    from vramancer.model.architecture import UnsupportedArchitecture
    from vramancer.model.loading import tensor_formats
    from vramancer.quantization.weights import kernel_path

    try:
        prepared = prepare(_load_options(args), reprofile=args.reprofile)
    except UnsupportedArchitecture as exc:
        if args.json:  # the refusal as data too, for scripts that ask what they can split
            print(json.dumps({"model": args.model, "supported": False, "reason": str(exc)}, indent=2))
        raise
    try:
        source, profile, devices, dtype, fallback = (prepared.source, prepared.profile, prepared.devices,
                                                     prepared.dtype, prepared.fallback)
        plan = prepared.plan(args.strategy)
        prediction = prepared.pricing.predict(plan.placement)
    finally:
        prepared.close()
    from vramancer.planning.tiers import tiers_device_parts, tiers_lines, tiers_report

    tiers = tiers_report(profile, plan, prepared.tiers, prediction.step_s) if prepared.tiers else {}
    simulated = {d.name: d.simulated for d in devices}
    rows = []
    for d in devices:
        need = plan.needs[d.name]
        rows.append({"device": d.name, "simulated": d.simulated, "weights": need.weights, "kv_cache": need.kv,
                     "workspace": need.workspace, "reserve": need.reserve, "need": need.total, "room": plan.rooms[d.name],
                     "empty_reason": plan.empty.get(d.name)})
    blocks = [{"device": b.device, "simulated": simulated.get(b.device, False), "first_layer": b.layers.first,
               "last_layer": b.layers.last, "bytes": sum(profile.layer_bytes[i] for i in b.layers)} for b in plan.blocks()]
    if args.json:
        print(json.dumps({"model": source.display_name, "supported": True, "architecture": profile.architecture,
                          "dtype": str(dtype).removeprefix("torch."), "dtype_reason": prepared.dtype_reason,
                          "weights": prepared.weights, "weights_reason": prepared.weights_reason,
                          "weight_bytes": profile.weight_bytes(),
                          "kernels": kernel_path(prepared.weights, dtype), "cuda_graphs": prepared.cuda_graphs,
                          "tensor_formats": tensor_formats(source, prepared.config, dtype, prepared.weights),
                          "strategy": plan.strategy,
                          "context": plan.context, "simulated_fallback": fallback, "placement": blocks,
                          "embed_device": plan.placement.embed, "head_device": plan.placement.head, "devices": rows,
                          **prediction.to_json(), **tiers}, indent=2))
        return 0
    print(f"{source.display_name} · {str(dtype).removeprefix('torch.')} · weights {prepared.weights} "
          f"({format_bytes(profile.weight_bytes())}) · {plan.strategy} · context {plan.context}"
          + (" · simulated devices" if fallback or all(d.simulated for d in devices) else ""))
    print(f"  dtype {prepared.dtype_reason}")
    print(f"  weights {prepared.weights_reason}")
    print(f"  kernels: {kernel_path(prepared.weights, dtype)}"
          + ("; CUDA graphs on: decode steps of layers on CUDA devices replay recordings" if prepared.cuda_graphs else ""))
    width = max([8] + [len(row["device"]) for row in rows])
    for row in rows:
        parts = [f"{b.layers}" for b in plan.blocks() if b.device == row["device"]]
        if plan.streamed:  # resident ranges, then those streamed in from a tier
            parts = tiers_device_parts(plan, row["device"])
        parts = (["embed"] if plan.placement.embed == row["device"] else []) + parts
        parts += ["head"] if plan.placement.head == row["device"] else []
        held = ', '.join(parts) or f"(nothing: {row['empty_reason']})"
        print(f"  {row['device']:<{width}} {held:<22} "
              f"needs {format_bytes(row['need'])} of {format_bytes(row['room'])} free")
    for line in tiers_lines(tiers) if tiers else []:
        print(line)
    tokens_per_s, step_ms = ((tiers["predicted_tokens_per_s"], tiers["predicted_step_ms"]) if tiers
                             else (prediction.tokens_per_s, prediction.step_s * 1000))
    print(f"  predicted {tokens_per_s:.1f} tokens/s "
          f"(decode step {step_ms:.1f} ms at {prediction.kv_length} cached tokens)")
    return 0


def _load_engine(args, quiet: bool):
    from vramancer.engine import Engine

    def progress(stage: str, fraction: float) -> None:
        if not quiet and sys.stderr.isatty():
            print(f"\r\x1b[2Kloading: {stage} {fraction:.0%}", end="", file=sys.stderr, flush=True)

    engine = Engine.load(_load_options(args), progress=progress, reprofile=args.reprofile)
    if not quiet and sys.stderr.isatty():
        print("\r\x1b[2K", end="", file=sys.stderr, flush=True)
    return engine


def _sampling(args) -> dict:
    from vramancer.scheduling.generation import SamplingSettings

    settings = SamplingSettings(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed,
                                getattr(args, "repetition_penalty", None))
    settings.check()  # before the model loads: a bad flag should not cost a load
    return settings.__dict__


def _generate(args) -> int:
    from vramancer.config.device_spec import parse_device_spec
    from vramancer.runtime.migration import parse_range

    sampling = _sampling(args)
    schedule = [_parse_migrate(text) for text in args.migrate]
    for text, (range_text, _, _) in zip(args.migrate, schedule):
        parse_range(range_text)
    parse_device_spec(_device_text(args))
    engine = _load_engine(args, quiet=args.json)
    try:
        return _generate_on(engine, args, schedule, sampling)
    finally:
        _release_nodes(engine)


def _release_nodes(engine) -> None:
    """Say goodbye to the nodes (they free what they held for us); local devices need nothing."""
    if engine.connected:
        engine.close()


def _generate_on(engine, args, schedule, sampling) -> int:
    from vramancer.runtime.migration import parse_range

    engine.auto_rebalance = args.auto_rebalance
    faults: list[str] = []
    engine.on_fault = lambda message, node, layers, recovered: (
        faults.append(message), None if args.json else print(f"\n[{message}]", file=sys.stderr, flush=True))
    if not args.json:
        engine.on_rebalance = lambda result, why: print(
            f"\n[{'rebalanced ' + result.describe() + ': ' if result else ''}{why}]", file=sys.stderr, flush=True)
    pending = sorted(schedule, key=lambda item: item[2])

    def on_step(step: int) -> None:
        while pending and pending[0][2] <= step:
            range_text, device, at = pending.pop(0)
            first, last = parse_range(range_text)
            result = engine.migrate(first, last, device, step=at)
            if not args.json:
                print(f"\n[migrated {result.describe()}]", file=sys.stderr, flush=True)

    on_step(0)
    on_text = None if args.json else (lambda piece: print(piece, end="", flush=True))
    result = engine.generate(args.prompt, raw=args.raw, on_text=on_text, on_step=on_step, **sampling)
    links = [link.to_json() for link in engine.link_stats()]
    if args.json:
        out = result.to_json()
        out.update(model=engine.source.display_name, dtype=str(engine.dtype).removeprefix("torch."),
                   weights=engine.weights, placement=engine.placement_json(), embed_device=engine.placement.embed,
                   head_device=engine.placement.head, links=links,
                   migrations=[m.to_json() for m in engine.migrations], faults=faults)
        print(json.dumps(out, indent=2))
    else:
        print()
        rate = f"{result.decode_tokens_per_s:.1f} tok/s" if result.decode_tokens_per_s else "—"
        ttft = f"{result.ttft_s:.2f} s" if result.ttft_s is not None else "—"
        print(f"[{result.new_tokens} tokens · first token {ttft} · {rate}]", file=sys.stderr)
    for range_text, device, at in pending:
        print(f"vramancer: the migration of {range_text} to {device} at step {at} never ran; "
              f"the answer ended after {result.new_tokens} tokens.", file=sys.stderr)
    return 0


def _parse_migrate(text: str) -> tuple[str, str, int]:
    """'0-9:cuda:1@8' -> ('0-9', 'cuda:1', 8). Device names may contain colons."""
    from vramancer.config.errors import VramancerError

    head, at, step = text.rpartition("@")
    range_text, colon, device = head.partition(":")
    if not (at and colon and range_text and device and step.isascii() and step.isdigit()):
        raise VramancerError(f"--migrate '{text}' is not of the form A-B:DEVICE@STEP (e.g. 0-9:sim2@8).")
    return range_text, device.strip(), int(step)


def _bench(args) -> int:
    from vramancer.kernels.cpu.fused_layer import is_fused
    from vramancer.quantization.weights import kernel_path
    from vramancer.runtime.graphs import is_graphed

    engine = _load_engine(args, quiet=args.json)
    try:
        engine.generate(args.prompt, max_new_tokens=4)  # warm-up
        runs = [engine.generate(args.prompt, max_new_tokens=args.max_new_tokens) for _ in range(args.rounds)]
    finally:
        _release_nodes(engine)
    rates = [r.decode_tokens_per_s for r in runs if r.decode_tokens_per_s]
    ttfts = [r.ttft_s for r in runs if r.ttft_s is not None]
    summary = {
        "model": engine.source.display_name,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "weights": engine.weights,
        "weight_bytes": engine.profile.weight_bytes(),
        "kernels": kernel_path(engine.weights, engine.dtype),
        "fused_decoder_layers": sum(is_fused(layer) for layer in engine.split.layer_modules),
        "cuda_graph_layers": sum(is_graphed(layer) for layer in engine.split.layer_modules),
        "devices": [d.name for d in engine.devices],
        "placement": engine.placement_json(),
        "rounds": args.rounds,
        "new_tokens": [r.new_tokens for r in runs],
        "decode_tokens_per_s_median": statistics.median(rates) if rates else None,
        "decode_tokens_per_s": rates,
        "ttft_s_median": statistics.median(ttfts) if ttfts else None,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"decode {summary['decode_tokens_per_s_median']:.1f} tok/s (median of {len(rates)}), "
              f"first token {summary['ttft_s_median']:.3f} s, on {', '.join(summary['devices'])} "
              f"({summary['dtype']}, weights {summary['weights']})")
        layers = len(engine.split.layer_modules)
        fused = f"; decode steps of {summary['fused_decoder_layers']}/{layers} decoder layers fused (2 calls each)"
        print(f"kernels: {summary['kernels']}{fused if summary['fused_decoder_layers'] else ''}")
        if engine.cuda_graphs:
            graphed = summary["cuda_graph_layers"]
            print(f"CUDA graphs: the decode steps of {graphed}/{layers} decoder layers replay recorded graphs"
                  if graphed else "CUDA graphs: no decoder layer is on a CUDA device, so every layer runs eagerly")
    return 0


def _dashboard(args, prepare) -> int:
    """Textual and the App only: the engine (torch, transformers) is imported after the first
    frame. A malformed --devices closes the screen with the usual one sentence and exit 2."""
    from vramancer.app import run_dashboard

    settings = None
    if args.serve is not None:  # the server's flags, as `vramancer serve` takes them
        settings = {"api_key": args.api_key, "cors_origins": tuple(args.cors_origin),
                    "allowed_hosts": tuple(args.allow_host), "limits": _limits(args), "max_batch": args.max_batch}
    return run_dashboard(_load_options(args), prepare, serve_port=args.serve, serve_settings=settings)


# --- helpers ---------------------------------------------------------------------------


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _set_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def _quiet_libraries() -> None:
    """transformers' progress bars and advice belong to its own scripts, not our output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF reader's own bar
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


def _version() -> str:
    from vramancer import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
