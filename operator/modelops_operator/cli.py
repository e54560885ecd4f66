"""The `modelops` command.

  modelops local up|down|status|url ...          the local control plane (see modelops_local)
  modelops promote|abort|retry NAME [-n NS]      manual rollout control, without editing the spec
  modelops status NAME [-n NS]                   phase, revisions, weight, analysis, history
  modelops optimize MODEL.onnx -o OUT.onnx ...   optimization with a benchmark and an accuracy gate

Manual control works with GitOps: it sets an annotation (modelops.dev/promote, /abort, /retry) that
the operator handles once; the spec in Git is never touched. The kubectl equivalent is
  kubectl annotate modeldeployment NAME modelops.dev/promote="$(date +%s)" --overwrite
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from . import GROUP, PLURAL, VERSION
from .rollout import ANNOTATIONS


def _api(kubeconfig: str | None) -> Any:
    from kubernetes import client, config

    try:
        if kubeconfig:
            return client.CustomObjectsApi(config.new_client_from_config(kubeconfig))
        try:
            config.load_incluster_config()
            return client.CustomObjectsApi()
        except config.ConfigException:
            return client.CustomObjectsApi(config.new_client_from_config())
    except Exception as e:  # config errors come in several types; all mean "cannot reach a cluster"
        raise SystemExit(f"error: cannot load a kubeconfig: {e}") from None


def _get(api: Any, name: str, ns: str) -> dict[str, Any]:
    from kubernetes.client.rest import ApiException

    try:
        return dict(api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name))
    except ApiException as e:
        if e.status == 404:
            raise SystemExit(f"error: ModelDeployment {ns}/{name} not found") from None
        raise SystemExit(f"error: reading ModelDeployment {ns}/{name} failed: {e.status} {e.reason}") from None


def cmd_request(args: argparse.Namespace) -> int:
    from kubernetes.client.rest import ApiException

    api = _api(args.kubeconfig)
    obj = _get(api, args.name, args.namespace)
    status = obj.get("status") or {}
    if args.command == "promote" and not status.get("rollout"):
        print(f"error: {args.namespace}/{args.name} has no rollout in progress (phase {status.get('phase')})",
              file=sys.stderr)
        return 1
    if args.command == "abort" and not status.get("rollout"):
        print(f"error: {args.namespace}/{args.name} has no rollout to abort (phase {status.get('phase')})",
              file=sys.stderr)
        return 1
    if args.command == "retry" and not status.get("failed"):
        print(f"error: {args.namespace}/{args.name} has no rolled-back revision to retry", file=sys.stderr)
        return 1
    value = str(time.time_ns())
    try:
        api.patch_namespaced_custom_object(GROUP, VERSION, args.namespace, PLURAL, args.name,
                                           {"metadata": {"annotations": {ANNOTATIONS[args.command]: value}}})
    except ApiException as e:
        print(f"error: annotating {args.namespace}/{args.name} failed: {e.status} {e.reason}", file=sys.stderr)
        return 1
    print(f"Requested {args.command} of modeldeployment {args.namespace}/{args.name}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    obj = _get(_api(args.kubeconfig), args.name, args.namespace)
    st = obj.get("status") or {}
    stable, canary = st.get("stable") or {}, st.get("canary") or {}
    print(f"Name:      {args.namespace}/{args.name}")
    print(f"Phase:     {st.get('phase', 'Unknown')}")
    print(f"Stable:    revision {stable.get('revision')} (model version {stable.get('modelVersion')})")
    if canary:
        print(f"Canary:    revision {canary.get('revision')} (model version {canary.get('modelVersion')}), "
              f"weight {st.get('canaryWeight', 0)}%")
    print(f"Replicas:  {(st.get('replicas') or {}).get('summary', '-')}")
    ro = st.get("rollout")
    if ro:
        a = ro.get("analysis") or {}
        print(f"Step:      {ro.get('step', 0) + 1}, analysis {a.get('verdict') or 'not yet measured'}, "
              f"{a.get('consecutiveFailures', 0)} consecutive failures")
        for m in a.get("measurements") or []:
            print(f"  {m['verdict']:12s} {m['message']}")
    if st.get("failed"):
        f = st["failed"]
        print(f"Failed:    revision {f['revision']} ({f['reason']}): {f['message']}")
    for c in st.get("conditions") or []:
        print(f"  {c['type']:12s} {c['status']:5s} {c['reason']}: {c['message']}")
    for h in (st.get("history") or [])[-5:]:
        extra = ""
        if "detectSeconds" in h:
            extra = f", detected in {h['detectSeconds']:.0f}s"
        if "rollbackSeconds" in h:
            extra += f", rolled back in {h['rollbackSeconds']:.0f}s"
        print(f"History:   {h.get('finishedAt')} revision {h['revision']} (model version {h.get('modelVersion')}) "
              f"{h['result']}{extra}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["optimize"]:
        from modelops_runtime.optimize import main as optimize_main

        return optimize_main(argv[1:])
    if argv[:1] == ["local"]:
        from modelops_local.cli import main as local_main

        return local_main(argv)
    p = argparse.ArgumentParser(prog="modelops", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("local", help="a local Kubernetes control plane with a process node (modelops local --help)")
    sub.add_parser("optimize", help="quantize, prune, simplify a model; measured and gated (modelops optimize -h)")
    for name, text in (("promote", "skip the remaining steps and promote the canary"),
                       ("abort", "roll the canary back now"),
                       ("retry", "try a rolled-back revision again"),
                       ("status", "show a ModelDeployment's rollout")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("name")
        sp.add_argument("-n", "--namespace", default="default")
    args = p.parse_args(argv)
    if args.command == "status":
        return cmd_status(args)
    return cmd_request(args)


if __name__ == "__main__":
    sys.exit(main())
