"""``tessera-site charter|plan|policy|activity``: governance from the command line.

The same services as the app's Governance and Activity pages (``site_client/core``): a person
reads the charter and each plan in plain language, and accepts, approves or refuses under their
own name; the site key signs, the site's record keeps it, and the participant sends it to the
coordinator the next time it connects. Offers arrive while the site is connected
(``tessera-site run`` or ``tessera-site sync``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

from shared.errors import GovernanceError
from site_client.core import governance_view as gv
from site_client.core.activity import load_activity, open_governance
from site_client.core.config import SiteDir


def add_parsers(sub: Any) -> None:
    charter = sub.add_parser("charter", help="the federation's terms: read and accept them")
    charter_sub = charter.add_subparsers(dest="charter_command", required=True)
    charter_sub.add_parser("show", help="print the current charter and whether it was accepted")
    accept = charter_sub.add_parser("accept", help="accept the current charter, signed")
    accept.add_argument("--name", required=True, help="your name, signed with the acceptance")
    accept.add_argument(
        "--version", type=int, default=None, help="the version you read (default: current)"
    )

    plan = sub.add_parser("plan", help="training plans offered to this site")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    plan_sub.add_parser("list", help="every plan offered, with its decision")
    show = plan_sub.add_parser("show", help="a plan explained in plain language")
    show.add_argument("plan_hash", help="plan hash (a unique prefix is enough)")
    approve = plan_sub.add_parser("approve", help="approve a plan, signed")
    approve.add_argument("plan_hash")
    approve.add_argument("--name", required=True, help="your name, signed with the decision")
    refuse = plan_sub.add_parser("refuse", help="refuse a plan with a reason, signed")
    refuse.add_argument("plan_hash")
    refuse.add_argument("--name", required=True, help="your name, signed with the decision")
    refuse.add_argument("--reason", required=True, help="why; sent to the consortium lead")

    policy = sub.add_parser("policy", help="this site's floor for every plan")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    policy_sub.add_parser("show", help="print the site policy")
    setp = policy_sub.add_parser("set", help="change settings of the site policy")
    setp.add_argument("--max-epsilon", help="largest privacy budget per run, or 'none'")
    setp.add_argument("--max-delta", help="largest delta (default 1e-5)")
    setp.add_argument(
        "--require-secure-aggregation", choices=("yes", "no"), help="refuse plans without it"
    )
    setp.add_argument("--hours", help="when training may run, HH:MM-HH:MM local time, or 'any'")
    setp.add_argument("--cpu-percent", type=int, help="share of this machine's cores, 1-100")

    dispute = sub.add_parser("dispute", help="dispute a round, a release or this site's credit")
    dispute_sub = dispute.add_subparsers(dest="dispute_command", required=True)
    dispute_sub.add_parser("list", help="the disputes this site raised")
    raise_ = dispute_sub.add_parser("raise", help="raise a dispute, signed")
    raise_.add_argument("--run", required=True, help="the run it is about")
    about = raise_.add_mutually_exclusive_group(required=True)
    about.add_argument("--round", type=int, help="a round of that run")
    about.add_argument("--release", help="a release version of that run")
    about.add_argument(
        "--contribution", action="store_true", help="this site's recorded contribution"
    )
    raise_.add_argument("--reason", required=True, help="what is wrong, for the consortium lead")
    raise_.add_argument("--name", required=True, help="your name, signed with the dispute")

    releases = sub.add_parser(
        "releases", help="model releases this site received, and its verdicts"
    )
    releases_sub = releases.add_subparsers(dest="releases_command")
    releases_sub.add_parser("list", help="every release held, with this site's verdict (default)")
    for verb, what in (("accept", "accept"), ("refuse", "refuse")):
        decide = releases_sub.add_parser(verb, help=f"{what} a release under your name, signed")
        decide.add_argument("version", help="the release version, X.Y")
        decide.add_argument("--name", required=True, help="your name, signed with the decision")
        decide.add_argument(
            "--reason",
            required=verb == "refuse",
            default="",
            help="why; sent to the consortium lead" + (" (needed)" if verb == "refuse" else ""),
        )

    activity = sub.add_parser("activity", help="everything this site did and signed")
    activity.add_argument("--json", action="store_true")


COMMANDS = ("charter", "plan", "policy", "dispute", "releases", "activity")


def dispatch(args: argparse.Namespace, site_dir: SiteDir) -> int:
    now = time.time()
    if args.command == "charter":
        return _charter(args, site_dir, now)
    if args.command == "plan":
        return _plan(args, site_dir, now)
    if args.command == "policy":
        return _policy(args, site_dir, now)
    if args.command == "dispute":
        return _dispute(args, site_dir, now)
    if args.command == "releases":
        if args.releases_command in ("accept", "refuse"):
            return _decide_release(args, site_dir, now)
        return _releases(site_dir)
    entries = load_activity(site_dir)
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
    else:
        for entry in entries:
            print(entry.line())
    return 0


def _charter(args: argparse.Namespace, site_dir: SiteDir, now: float) -> int:
    view = gv.load_governance_view(site_dir)
    charter = view.charter
    if charter is None:
        print("No charter has been received from the coordinator yet.")
        return 0 if args.charter_command == "show" else 2
    if args.charter_command == "show":
        print(f"Charter version {charter.version} (SHA-256 {charter.sha256})")
        print(view.charter_status)
        print()
        print(charter.text)
        return 0
    version = args.version or charter.version
    if version != charter.version:
        raise GovernanceError(
            f"version {version} is not the current charter (version {charter.version}); read "
            "the current one with 'tessera-site charter show'",
            code="governance.charter_version",
        )
    signature = gv.accept_charter(site_dir, version, args.name, now=now)
    print(
        f"Charter version {version} accepted by {signature.person}, signed with this site's "
        "key. It is sent to the coordinator the next time this site connects."
    )
    return 0


def _find_plan(site_dir: SiteDir, prefix: str) -> gv.PlanView:
    view = gv.load_governance_view(site_dir)
    matches = [p for p in view.plans if p.plan_hash.startswith(prefix.lower())]
    if len(matches) != 1 or len(prefix) < 6:
        raise GovernanceError(
            f"no single plan matches {prefix!r}; 'tessera-site plan list' shows them",
            code="governance.unknown_plan",
        )
    return matches[0]


def _plan(args: argparse.Namespace, site_dir: SiteDir, now: float) -> int:
    if args.plan_command == "list":
        view = gv.load_governance_view(site_dir)
        if not view.plans:
            print("No plan has been offered to this site yet.")
        for p in view.plans:
            print(f"{p.plan_hash}  {p.name}: {p.short_status()}")
        return 0
    plan = _find_plan(site_dir, args.plan_hash)
    if args.plan_command == "show":
        print(plan.summary.text())
        print()
        print(f"{'Decision':<15} {plan.status()}")
        for reason in plan.refusals:
            print(f"{'Below policy':<15} {reason}")
        return 0
    approve = args.plan_command == "approve"
    decision = gv.decide_plan(
        site_dir,
        plan.plan_hash,
        approve=approve,
        reason="" if approve else args.reason,
        person=args.name,
        now=now,
    )
    verb = "approved" if approve else "refused"
    print(
        f"Plan {plan.title} {verb} by {decision.person}, signed with this site's key. It is "
        "sent to the coordinator the next time this site connects."
    )
    return 0


def _policy(args: argparse.Namespace, site_dir: SiteDir, now: float) -> int:
    governance = open_governance(site_dir)
    try:
        current = governance.policy()
    finally:
        governance.close()
    if args.policy_command == "show":
        for key, value in current.to_dict().items():
            print(f"{key}: {value}")
        return 0
    form = gv.policy_form(current)
    changes: dict[str, Any] = {}
    if args.max_epsilon is not None:
        changes["max_epsilon"] = "" if args.max_epsilon.lower() == "none" else args.max_epsilon
    if args.max_delta is not None:
        changes["max_delta"] = args.max_delta
    if args.require_secure_aggregation is not None:
        changes["require_secure_aggregation"] = args.require_secure_aggregation == "yes"
    if args.hours is not None:
        changes["training_hours"] = "" if args.hours.lower() == "any" else args.hours
    if args.cpu_percent is not None:
        changes["cpu_percent"] = args.cpu_percent
    policy = gv.parse_policy_form(dataclasses.replace(form, **changes))
    saved = gv.save_policy(site_dir, policy, now=now)
    print("Site policy saved:", file=sys.stderr)
    for key, value in saved.to_dict().items():
        print(f"{key}: {value}")
    return 0


def _dispute(args: argparse.Namespace, site_dir: SiteDir, now: float) -> int:
    from shared.crypto.keys import load_private_key
    from site_client.core.governance_link import GovernanceLink, pending_disputes, raise_dispute

    config = site_dir.load()
    record = open_governance(site_dir)
    try:
        link = GovernanceLink(record, config, load_private_key(site_dir.key_file))
        if args.dispute_command == "list":
            disputes = pending_disputes(link)
            if not disputes:
                print("This site has raised no dispute.")
            for d in disputes:
                about = {"round": f"round {d.round}", "release": f"release {d.release}"}
                print(
                    f"{d.dispute_id}  {d.run_id} {about.get(d.subject, 'contribution')}  "
                    f"{d.person}: {d.reason}"
                )
            return 0
        subject = (
            "round" if args.round is not None else "release" if args.release else "contribution"
        )
        dispute = raise_dispute(
            link,
            subject=subject,
            run_id=args.run,
            rnd=args.round or 0,
            release=args.release or "",
            reason=args.reason,
            person=args.name,
            now=now,
        )
    finally:
        record.close()
    print(
        f"Dispute {dispute.dispute_id} raised by {dispute.person}, signed with this site's key. "
        "It is sent to the coordinator the next time this site connects."
    )
    return 0


def _decide_release(args: argparse.Namespace, site_dir: SiteDir, now: float) -> int:
    from site_client.core.release_view import decide

    accepted = args.releases_command == "accept"
    message = decide(
        site_dir, args.version, accepted=accepted, person=args.name, reason=args.reason, now=now
    )
    verb = "accepted" if accepted else "refused"
    print(
        f"Release {message.version} {verb} by {message.person}, signed with this site's key. "
        "It is sent to the coordinator the next time this site connects."
    )
    return 0


def _releases(site_dir: SiteDir) -> int:
    from shared.crypto.keys import load_private_key
    from site_client.core.governance_link import GovernanceLink
    from site_client.core.releases import held, release_dir, verdicts

    versions = held(site_dir)
    if not versions:
        print("This site has received no model release yet.")
        return 0
    record = open_governance(site_dir)
    try:
        link = GovernanceLink(record, site_dir.load(), load_private_key(site_dir.key_file))
        reported = verdicts(link)
    finally:
        record.close()
    for version in versions:
        verdict = reported.get(version)
        if verdict is None:
            state = "verified, not yet validated here"
        else:
            auc = verdict.metrics.get("auc") if verdict.metrics else None
            state = ("accepted" if verdict.accepted else f"refused: {verdict.reason}") + (
                f", AUC here {auc:.3f}" if isinstance(auc, float) else ""
            )
        print(f"release {version}  {release_dir(site_dir, version)}  {state}")
    return 0
