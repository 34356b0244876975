"""Our HTTP calls and command lines against SGLang's own source (the pinned wheels' files that
scripts/setup_env.sh extracts into .cache/sglang_contract; read with `ast`, never imported):

- every route the client, the launcher, the Slurm roles and the weight syncs call exists in
  SGLang 0.5.23's `http_server.py` with the HTTP method we use;
- every JSON body we send to such a route has only fields of the request class SGLang's handler
  parses it into (`io_struct.py`, base classes included) and every field it requires
  (`/generate` bodies are validated by SGLang's `api_types.py` in test_sglang_contract.py);
- every flag our launcher and launch plans put on `sglang.launch_server` exists in SGLang's server
  arguments, and every router flag in sglang-router 0.3.2's `router_args.py`.

Our side is read statically too (every call site, whatever runs in a test), so a new call is
checked the day it is written.
"""

from __future__ import annotations

import ast
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTRACT = os.path.join(ROOT, ".cache", "sglang_contract")
OUR_HTTP_SOURCES = ["ctpo_megatron/rollout/serving/client.py", "ctpo_megatron/rollout/serving/launcher.py",
                    "ctpo_megatron/cluster/role.py", *sorted(
                        os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/ctpo_megatron/rollout/weight_sync/*.py"))]
ROUTE = re.compile(r"^/[a-z_]+$")


def _parse(name: str) -> ast.Module:
    path = os.path.join(CONTRACT, name)
    if not os.path.exists(path):
        pytest.fail(f"{path} missing: run scripts/setup_env.sh (it extracts SGLang's files)", pytrace=False)
    return ast.parse(open(path).read())


# --- SGLang's side ---------------------------------------------------------------------------

def sglang_routes() -> dict[str, tuple[set[str], str | None]]:
    """path -> (HTTP methods, name of the request class its handler parses the body into)."""
    routes = {}
    for node in ast.walk(_parse("http_server.py")):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                    and isinstance(dec.func.value, ast.Name) and dec.func.value.id == "app"
                    and dec.args and isinstance(dec.args[0], ast.Constant)):
                continue
            kind = dec.func.attr
            if kind == "api_route":
                (methods,) = [k.value for k in dec.keywords if k.arg == "methods"]
                verbs = {e.value for e in methods.elts}
            else:
                verbs = {kind.upper()}
            routes[dec.args[0].value] = (verbs, _body_class(node))
    return routes


def _body_class(fn: ast.AST) -> str | None:
    """`obj: Annotated[X, Body()]` or `obj: X` (X from io_struct) -> "X"."""
    for arg in fn.args.args:
        ann = arg.annotation
        if isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "Annotated":
            ann = ann.slice.elts[0]
        if isinstance(ann, ast.Name) and ann.id.endswith(("ReqInput", "Req")):
            return ann.id
    return None


def request_fields(class_name: str) -> tuple[set[str], set[str]]:
    """(all fields, required fields) of an io_struct request class, base classes included."""
    classes = {n.name: n for n in _parse("io_struct.py").body if isinstance(n, ast.ClassDef)}
    fields, required = set(), set()
    pending = [class_name]
    while pending:
        cls = classes[pending.pop()]
        pending += [b.id for b in cls.bases if isinstance(b, ast.Name) and b.id in classes]
        for stmt in cls.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) \
                    and "ClassVar" not in ast.unparse(stmt.annotation):
                fields.add(stmt.target.id)
                if stmt.value is None:
                    required.add(stmt.target.id)
    return fields, required


def server_flags() -> set[str]:
    """Flags of `sglang.launch_server`: the `A[type, "help" | Arg(...)]` fields its parser is
    built from (arg_groups/fields/*.py) and the ones server_args.py adds by hand."""
    flags = set()
    for path in sorted(glob.glob(os.path.join(CONTRACT, "fields", "*.py"))):
        for node in ast.walk(ast.parse(open(path).read())):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(node.annotation, ast.Subscript)
                    and isinstance(node.annotation.value, ast.Name) and node.annotation.value.id == "A"):
                continue
            meta = node.annotation.slice.elts[1] if isinstance(node.annotation.slice, ast.Tuple) else None
            keywords = {k.arg: k.value for k in meta.keywords} if isinstance(meta, ast.Call) else {}
            if "no_cli" in keywords and ast.literal_eval(keywords["no_cli"]):
                continue
            name = (ast.literal_eval(keywords["cli_name"]) if "cli_name" in keywords
                    else "--" + node.target.id.replace("_", "-"))
            flags.add(name)
            flags.update(ast.literal_eval(keywords["aliases"]) if "aliases" in keywords else [])
    flags |= _add_argument_flags(_parse("server_args.py"))
    return flags


def _add_argument_flags(tree: ast.Module) -> set[str]:
    """Option strings of every `*.add_argument(...)` call (f-strings with `prefix` = "")."""
    flags = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("-"):
                    flags.add(arg.value)
                elif isinstance(arg, ast.JoinedStr):
                    flags.add("".join(v.value for v in arg.values if isinstance(v, ast.Constant)))
    return flags


def router_flags() -> set[str]:
    return _add_argument_flags(_parse("router_args.py"))


# --- our side --------------------------------------------------------------------------------

class Call:
    def __init__(self, where: str, method: str, path: str, keys: set[str] | None):
        self.where, self.method, self.path, self.keys = where, method, path, keys

    def __repr__(self) -> str:
        return f"{self.method} {self.path} at {self.where}"


def our_calls() -> list[Call]:
    """Every HTTP call site in OUR_HTTP_SOURCES with its method and body keys.

    Methods: `_request(METHOD, url, path, body)` / `_all(METHOD, path, body)` (the client),
    `calls.all(path, body)` / `calls.submit_all(path, lambda i, url: body)` (the weight syncs'
    ServerCalls, POST; `all_bodies` takes one body per server), `calls.pool.submit(calls.get | calls.post, url, path, ...)`, and `url + "/path"` opened with urllib (GET: no data).
    """
    calls = []
    for rel in OUR_HTTP_SOURCES:
        tree = ast.parse(open(os.path.join(ROOT, rel)).read())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and _route(node.right):
                calls.append(Call(f"{rel}:{node.lineno}", "GET", node.right.value, None))
            if not isinstance(node, ast.Call) or not isinstance(node.func, (ast.Attribute, ast.Name)):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            idx = next((i for i, a in enumerate(node.args) if _route(a)), None)
            if idx is None:
                continue
            where = f"{rel}:{node.lineno}"
            if name in ("_request", "_all"):
                method = node.args[0].value
            elif name in ("all", "submit_all", "all_bodies") and "calls" in ast.unparse(node.func):
                method = "POST"
            elif name == "submit" and "calls" in ast.unparse(node.func) and idx >= 1 \
                    and ast.unparse(node.args[0]).endswith((".get", ".post")):
                # calls.pool.submit(calls.get | calls.post, url, path, ...): ServerCalls' own methods
                method = "GET" if ast.unparse(node.args[0]).endswith(".get") else "POST"
            else:
                if name not in ("ServerError", "GenerationError"):  # error messages naming a path
                    raise AssertionError(f"{where}: unknown HTTP call {ast.unparse(node)[:80]}")
                continue
            body = node.args[idx + 1] if len(node.args) > idx + 1 else None
            path = node.args[idx].value
            # /generate bodies come from build_generate_body; api_types.py validates them.
            keys = None if body is None or path == "/generate" else _dict_keys(body, node, parents, where)
            calls.append(Call(where, method, path, keys))
    return calls


def _route(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and bool(ROUTE.match(node.value))


def _enclosing(node, parents, kinds):
    while node in parents:
        node = parents[node]
        if isinstance(node, kinds):
            return node
    return None


def _dict_keys(expr: ast.AST, at: ast.AST, parents: dict, where: str) -> set[str]:
    """Keys of the dict `expr` evaluates to: a literal, a lambda returning one, a local name
    assigned one, or `self.<method>(...)` returning one."""
    if isinstance(expr, ast.Dict):
        assert all(isinstance(k, ast.Constant) for k in expr.keys), f"{where}: computed or ** keys"
        return {k.value for k in expr.keys}
    if isinstance(expr, ast.Lambda):
        return _dict_keys(expr.body, at, parents, where)
    if isinstance(expr, ast.ListComp):  # calls.all_bodies(path, [{...} for ...]): one body per server
        return _dict_keys(expr.elt, at, parents, where)
    fn = _enclosing(at, parents, (ast.FunctionDef, ast.AsyncFunctionDef))
    if isinstance(expr, ast.Name) and fn is not None:
        assigns = [n for n in ast.walk(fn) if isinstance(n, ast.Assign)
                   and any(isinstance(t, ast.Name) and t.id == expr.id for t in n.targets)]
        assert len(assigns) == 1, f"{where}: body `{expr.id}` is not assigned exactly once"
        return _dict_keys(assigns[0].value, assigns[0], parents, where)
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and ast.unparse(expr.func.value) == "self":
        cls = _enclosing(at, parents, ast.ClassDef)
        (method,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == expr.func.attr]
        (ret,) = [n for n in ast.walk(method) if isinstance(n, ast.Return)]
        return _dict_keys(ret.value, ret, parents, where)
    raise AssertionError(f"{where}: cannot read the body {ast.unparse(expr)[:80]} statically")


# --- the checks ------------------------------------------------------------------------------

def test_the_readers_find_sglangs_routes_classes_and_flags():
    routes = sglang_routes()
    assert routes["/generate"] == ({"POST", "PUT"}, "GenerateReqInput")
    assert routes["/health"][0] == {"GET"}
    assert request_fields("UpdateWeightFromDiskReqInput")[1] == {"model_path"}
    assert "rid" in request_fields("AbortReq")[0]  # inherited from BaseReq
    assert {"--model-path", "--tp-size", "--port"} <= server_flags()
    assert {"--worker-urls", "--policy", "--host", "--port"} <= router_flags()
    assert len(our_calls()) >= 20


def test_every_route_we_call_exists_with_our_method():
    routes = sglang_routes()
    problems = [f"{c}: not a route of SGLang's http_server" for c in our_calls() if c.path not in routes]
    problems += [f"{c}: SGLang serves {sorted(routes[c.path][0])}" for c in our_calls()
                 if c.path in routes and c.method not in routes[c.path][0]]
    assert not problems, "\n".join(problems)


def test_every_body_we_send_matches_sglangs_request_class():
    routes = sglang_routes()
    problems = []
    for call in our_calls():
        if call.keys is None:  # no body, or /generate (test_sglang_contract.py validates those)
            continue
        cls = routes[call.path][1]
        if cls is None:
            if call.keys:
                problems.append(f"{call}: SGLang reads no body there, we send {sorted(call.keys)}")
            continue
        fields, required = request_fields(cls)
        if call.keys - fields:
            problems.append(f"{call}: {sorted(call.keys - fields)} are not fields of {cls}")
        if required - call.keys:
            problems.append(f"{call}: {cls} requires {sorted(required - call.keys)}")
    assert not problems, "\n".join(problems)


def _emitted_command_lines() -> dict[str, list[list[str]]]:
    """Server and router argv our code emits: the launcher with every option set, the Slurm plan
    of the paper's cluster config."""
    from ctpo_megatron.cluster.plan import build_plan
    from ctpo_megatron.config.store import load_config
    from ctpo_megatron.rollout.serving.launcher import LaunchConfig, router_command, sglang_server_command

    cfg = LaunchConfig(model_path="/m", backend="sglang", tp_size=2, mem_fraction_static=0.8,
                       load_format="dummy", dtype="bfloat16", seed=1, router=True, enable_memory_saver=True)
    plan = build_plan(load_config(["model.path=/ckpt/q"]), [], hosts=[f"h{i}" for i in range(12)])
    servers = [sglang_server_command(cfg, 0, 30000)] + [s.argv for s in plan.servers]
    assert all("sglang.launch_server" in argv for argv in servers)
    return {"server": servers, "router": [router_command(cfg, ["http://a:1", "http://b:2"], 9000),
                                          plan.router_argv]}


def _flags(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def test_every_server_and_router_flag_exists_in_sglang():
    lines = _emitted_command_lines()
    known = {"server": server_flags(), "router": router_flags()}
    problems = [f"{kind} flag {flag} (in {' '.join(argv)[:120]}...)" for kind, argvs in lines.items()
                for argv in argvs for flag in sorted(_flags(argv) - known[kind])]
    assert not problems, "flags SGLang does not define:\n" + "\n".join(problems)


def test_embedded_server_bodies_match_sglangs_request_classes():
    """The embedded server's body table (`server/bodies.py`): each endpoint is an SGLang route
    whose request class has every field we read, and requires exactly the fields we require."""
    from ctpo_megatron.rollout.serving.server.bodies import BODIES, REQUIRED

    routes = sglang_routes()
    assert {"release_memory_occupation", "resume_memory_occupation"} <= set(BODIES)
    problems = []
    for endpoint, table in BODIES.items():
        route = routes.get("/" + endpoint)
        if route is None or route[1] is None:
            problems.append(f"/{endpoint}: no SGLang route parsing a request class")
            continue
        fields, required = request_fields(route[1])
        ours_required = {name for name, (_, default) in table.items() if default is REQUIRED}
        if set(table) - fields:
            problems.append(f"/{endpoint}: {sorted(set(table) - fields)} are not fields of {route[1]}")
        if ours_required != required:
            problems.append(f"/{endpoint}: we require {sorted(ours_required)}, {route[1]} {sorted(required)}")
    assert not problems, "\n".join(problems)
