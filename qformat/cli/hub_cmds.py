"""`qformat push`: publish a converted folder on the Hugging Face Hub."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    push = sub.add_parser("push", help="upload a converted model folder to the Hub (skips unchanged files)",
                          description="Upload a qformat model folder to a Hub repository. Tokens come from --token, "
                          "HF_TOKEN or the login cache; HF_ENDPOINT is honoured. The local folder is never modified.")
    push.add_argument("folder", help="converted model folder")
    push.add_argument("repo_id", help="target repository, e.g. user/model-qformat-spqr")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", help="branch to push to (must exist in an existing repository)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--message", help="commit message")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the login cache)")
    push.add_argument("--base-model", metavar="ID", help="Hub id of the model this one was quantized from: the "
                      "uploaded card's base_model link (base_model_relation: quantized); the folder is not modified")
    push.set_defaults(func=run_push)


def run_push(args: argparse.Namespace) -> int:
    from ..hub import push_folder

    result = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                         create_pr=args.create_pr, message=args.message, token=args.token,
                         base_model=args.base_model)
    print(f"pushed {args.folder} to {result.repo_id}@{result.revision}: {len(result.uploaded)} uploaded, "
          f"{len(result.skipped)} unchanged")
    if result.pr_url:
        print(f"pull request: {result.pr_url}")
    elif result.commit_url:
        print(f"commit: {result.commit_url}")
    else:
        print("nothing changed: no commit made")
    return 0
