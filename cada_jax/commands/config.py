"""`cada config`: the config reference and the resolved config.

    cada config --describe [SECTION ...]     every key (or a section's) with its type, default and doc
    cada config CONFIG.yaml [key=value ...]  the config after defaults and overrides, as YAML

The second form checks a config without running anything: an unknown key, a wrong type or a bad
value is the same one-line error the other commands give.
"""

from __future__ import annotations


def cmd_config(args) -> int:
    import yaml

    from cada_jax.config import describe_text, load_config, to_dict

    if args.describe:
        sections = ([args.config] if args.config else []) + list(args.overrides)
        print(describe_text(sections))
        return 0
    if not args.config:
        raise ValueError("cada config: give a YAML config to resolve, or --describe [SECTION ...] for the reference")
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False).rstrip())
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("config", help="list every config key (--describe), or print a resolved config")
    p.add_argument("config", nargs="?", help="YAML config to resolve (with --describe: a section name)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (with --describe: more section names)")
    p.add_argument("--describe", action="store_true", help="list the keys with types, defaults and docs")
    p.set_defaults(fn=cmd_config)
