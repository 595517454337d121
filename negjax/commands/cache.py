"""`negjax cache [list|clean]`: what the negjax cache holds, and removing what no job can use.

    negjax cache                      # per kind: entries, size, how many stale / abandoned
    negjax cache list --all-entries   # one line per entry, with why it is stale
    negjax cache clean                # remove stale and abandoned entries (safe while jobs run)
    negjax cache clean --dry-run      # say what would go
    negjax cache clean --all          # empty it (not while jobs run)
"""

from __future__ import annotations

import json

from negjax.errors import NegjaxError


def add_parser(sub):
    p = sub.add_parser("cache", help="what the cache holds (token stores, compiled programs, "
                       "models); remove what no job can use again")
    p.add_argument("action", nargs="?", default="list", choices=("list", "clean"),
                   help="list (default) or clean")
    p.add_argument("--dir", help="the cache directory (default: $NEGJAX_CACHE, ~/.cache/negjax)")
    p.add_argument("--all-entries", action="store_true", help="list: one line per entry")
    p.add_argument("--json", action="store_true", help="list: one JSON object per entry")
    p.add_argument("--dry-run", action="store_true", help="clean: only say what would be removed")
    p.add_argument("--all", action="store_true", help="clean: remove every entry but those being "
                   "written now (running jobs would rebuild or recompile theirs)")
    return p


def _gib(n: int) -> str:
    if n >= 2**27:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def run(args) -> int:
    from negjax.cache import remove, scan
    from negjax.utils import default_cache_dir

    root = default_cache_dir(args.dir)
    if args.dir and not root.is_dir():
        raise NegjaxError(f"{root}: no such cache directory")
    entries = scan(root)
    if args.action == "list":
        if args.json:
            for e in entries:
                print(json.dumps({"path": str(e.path), "kind": e.kind, "bytes": e.bytes,
                                  "status": e.status, "why": e.why}))
            return 0
        print(f"{root}: {len(entries)} entries, {_gib(sum(e.bytes for e in entries))}")
        if args.all_entries:
            for e in entries:
                why = f"  ({e.why})" if e.why else ""
                print(f"  {e.status:9s} {e.kind:14s} {_gib(e.bytes):>11s}  {e.path.name}{why}")
            return 0
        kinds: dict[str, list] = {}
        for e in entries:
            kinds.setdefault(e.kind, []).append(e)
        for kind, es in kinds.items():
            gone = [e for e in es if e.status in ("stale", "abandoned")]
            extra = f"; {len(gone)} stale or abandoned, {_gib(sum(e.bytes for e in gone))}" if gone else ""
            print(f"  {kind:14s} {len(es):6d} {_gib(sum(e.bytes for e in es)):>11s}{extra}")
        if any(e.status in ("stale", "abandoned") for e in entries):
            print("`negjax cache clean` removes the stale and abandoned ones")
        return 0
    doomed = [e for e in entries if e.status in ("stale", "abandoned")
              or (args.all and e.status != "building")]
    for e in doomed:
        if not args.dry_run:
            remove(e)
    verb = "would remove" if args.dry_run else "removed"
    for e in doomed:
        print(f"  {verb} {e.kind} {e.path.name} ({_gib(e.bytes)}{', ' + e.why if e.why else ''})")
    print(f"{verb} {len(doomed)} of {len(entries)} entries, {_gib(sum(e.bytes for e in doomed))}")
    return 0
