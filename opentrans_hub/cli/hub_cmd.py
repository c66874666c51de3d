"""``opentrans-hub push NAME|PATH --repo-id ORG/REPO`` and ``pull hf://ORG/REPO[@REV] [--name NAME]``.

The server is ``HF_ENDPOINT``; the token comes from ``HF_TOKEN`` or the saved HF login, never a flag (flags
end up in shell history and logs).
"""

from __future__ import annotations

import argparse

from ._common import print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("push", help="publish a subnetwork, selection or packed backbone (with model card)")
    p.add_argument("ref", metavar="NAME|PATH")
    p.add_argument("--repo-id", required=True, metavar="ORG/REPO")
    p.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--license", help="license for the model card (default: from provenance, else apache-2.0)")
    p.add_argument("--base-model", metavar="HUB_ID", help="base model the card names (default: from provenance)")
    p.add_argument("--registry", metavar="DIR", help="registry folder for NAME")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_push)

    p = subparsers.add_parser("pull", help="download and verify hf://ORG/REPO[@REVISION], optionally name it")
    p.add_argument("ref", metavar="hf://ORG/REPO[@REVISION]")
    p.add_argument("--name", help="add it to the registry under this name")
    p.add_argument("--registry", metavar="DIR", help="registry folder for --name")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_pull)


def run_push(args: argparse.Namespace) -> int:
    from ..zoo.hub import push
    from ..zoo.registry import Registry

    registry = Registry(args.registry) if args.registry else None
    result = push(args.ref, args.repo_id, revision=args.revision, private=args.private, registry=registry,
                  license=args.license, base_model=args.base_model)
    if args.json:
        print_json(result)
    else:
        print(f"pushed {result['kind']} {result['sha256'][:12]} to {result['repo_id']}@{result['revision']} "
              f"(commit {result['commit']}); load it with {result['ref']}")
    return 0


def run_pull(args: argparse.Namespace) -> int:
    from ..zoo.hub import pull
    from ..zoo.registry import Registry

    registry = Registry(args.registry) if args.registry else None
    _, record = pull(args.ref, name=args.name, registry=registry)
    if args.json:
        print_json(record)
    else:
        named = f" as {record['name']}" if "name" in record else ""
        print(f"pulled {record['kind']} {record['sha256'][:12]} from {record['repo_id']}@{record['commit']}{named}: "
              f"{record['path']}")
    return 0
