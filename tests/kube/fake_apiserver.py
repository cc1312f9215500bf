"""A small Kubernetes API server for tests: the endpoints aidc uses, with the API's semantics.

No real API server can be installed on these machines, so aidc's Kubernetes backend, its
leader election and the controller's node watch are tested with the official `kubernetes`
client against this server. What it implements, and only that:

* nodes: list (labelSelector on equality), get, watch (resourceVersion, timeoutSeconds, an
  ERROR event with code 410 when the asked version was compacted away), patch (strategic
  merge, JSON merge, JSON patch), replace, delete; `nodes/{name}/status` patch and replace.
* pods: list (all namespaces, or one; fieldSelector `spec.nodeName=`), eviction (a pod marked
  as protected by a PodDisruptionBudget answers 429, as the API does while the budget is spent).
* devicetaintrules (resource.k8s.io/v1alpha3, cluster-scoped): create, list, get, delete.
* events (core/v1 and events.k8s.io/v1): create. leases (coordination.k8s.io/v1): get, create, replace.
* jobs (batch/v1): create, list (labelSelector on equality), get, get status, delete; secrets
  (core/v1): create, get, delete. No controller runs here: a Job gets no pods and no status
  unless the test plays the job controller and kubelet (`jobs`, `secret`, `set_job_status`).

Field ownership as the API server tracks it for Update operations (`metadata.managedFields`):
a write through the API names its manager (`fieldManager`, else the User-Agent up to its `/`),
and every field of spec, labels or annotations it changes or adds becomes that manager's alone,
a field it removes nobody's; a write that leaves a field's value as it was moves nothing. Lists
are owned whole (the real server keys some, taints by key and effect). `set_node` writes as a
named manager too.

Semantics kept: every write bumps the object's `metadata.resourceVersion`; a replace or a
merge patch naming a stale resourceVersion gets 409 Conflict; a create of an existing name
gets 409 AlreadyExists; a missing object 404. Every object the server stores or receives is
validated with kubernetes-validate (strict) and an invalid one is refused with 422, as the API
server refuses it; refusals are kept in `invalid` for the tests to assert on. Faults for tests:
`fail_next(code, n)` answers the next n requests with that status; `stop()` makes it unreachable.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate

K8S_VERSION = "1.33"
# resource.k8s.io's version serving DeviceTaintRule in that release (alpha, DRADeviceTaints gate).
DRA_VERSION = "v1alpha3"
# Strategic merge: lists merged by key rather than replaced (from the API's patchMergeKey tags).
MERGE_KEYS = {("status", "conditions"): "type", ("status", "addresses"): "type"}


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


class FakeApiServer:
    def __init__(self, history: int = 1000):
        self.lock = threading.Condition()
        self.rv = 100
        self.nodes: dict[str, dict] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.leases: dict[tuple[str, str], dict] = {}
        self.jobs: dict[tuple[str, str], dict] = {}
        self.secrets: dict[tuple[str, str], dict] = {}
        # DeviceTaintRules are cluster-scoped: keyed (None, name).
        self.device_taint_rules: dict[tuple[None, str], dict] = {}
        self.events: list[dict] = []
        self.history: list[tuple[int, str, dict]] = []  # (rv, type, node) for node watches
        self.history_size = history
        self.compacted_rv = self.rv
        self.pdb_protected: set[tuple[str, str]] = set()
        self.requests: list[tuple[str, str, str]] = []  # (method, path, user-agent)
        self.invalid: list[str] = []
        self._fail: list[int] = []
        self._server: ThreadingHTTPServer | None = None

    # -- life ---------------------------------------------------------------------
    def start(self, host: str = "127.0.0.1") -> str:
        """Serve on `host` (a test that runs controllers in network namespaces binds 0.0.0.0 from
        inside a namespace of its own: the socket belongs to the namespace it was made in)."""
        server = ThreadingHTTPServer((host, 0), _handler(self))
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            with self.lock:
                self.lock.notify_all()

    def client(self, user_agent: str = "aidc-test"):
        """An ApiClient of the official client pointed at this server."""
        from kubernetes import client

        config = client.Configuration()
        config.host = self.url
        api = client.ApiClient(config)
        api.user_agent = user_agent
        return api

    # -- test controls ------------------------------------------------------------------
    def fail_next(self, code: int, n: int = 1) -> None:
        with self.lock:
            self._fail += [code] * n

    def add_node(self, name: str, labels: dict | None = None, taints: list | None = None,
                 unschedulable: bool = False, ready: bool = True) -> dict:
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})},
                             "uid": str(uuid.uuid4()), "creationTimestamp": _now()},
                "spec": {**({"taints": taints} if taints else {}), **({"unschedulable": True} if unschedulable else {})},
                "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                           "reason": "KubeletReady" if ready else "KubeletNotReady",
                                           "message": "", "lastHeartbeatTime": _now(),
                                           "lastTransitionTime": _now()}]}}
        with self.lock:
            return copy.deepcopy(self._store_node(name, node, "ADDED"))

    def add_pod(self, namespace: str, name: str, node: str, owner_kind: str | None = None,
                pdb_protected: bool = False, priority_class: str | None = None, priority: int | None = None,
                annotations: dict | None = None) -> None:
        meta = {"name": name, "namespace": namespace, "uid": str(uuid.uuid4())}
        if owner_kind:
            meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner_kind, "name": f"{name}-owner",
                                        "uid": str(uuid.uuid4()), "controller": True}]
        if annotations:
            meta["annotations"] = dict(annotations)
        spec = {"nodeName": node, "containers": [{"name": "main", "image": "busybox"}]}
        # The priority admission plugin resolves a class to its value, as the API server does.
        resolved = {"system-node-critical": 2000001000, "system-cluster-critical": 2000000000}.get(priority_class)
        if priority_class:
            spec["priorityClassName"] = priority_class
        if priority is not None or resolved is not None:
            spec["priority"] = priority if priority is not None else resolved
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": {"phase": "Running"}}
        self._validate(pod)
        with self.lock:
            self.rv += 1
            pod["metadata"]["resourceVersion"] = str(self.rv)
            self.pods[(namespace, name)] = pod
            if pdb_protected:
                self.pdb_protected.add((namespace, name))

    def delete_node(self, name: str) -> None:
        with self.lock:
            node = self.nodes.pop(name)
            self.rv += 1
            self._record("DELETED", node)

    def set_node(self, name: str, mutate, manager: str = "test-operator") -> None:
        """Change a node as another actor would (an operator, the kubelet), as field manager `manager`."""
        with self.lock:
            node = copy.deepcopy(self.nodes[name])
            mutate(node)
            _manage(self.nodes[name], node, manager)
            self._store_node(name, node, "MODIFIED")

    def field_owners(self, name: str, *path: str) -> list[str]:
        """The managers that own the field at `path` (e.g. "spec", "unschedulable")."""
        with self.lock:
            return sorted(e["manager"] for e in self.nodes[name]["metadata"].get("managedFields", [])
                          if tuple(path) in _decode_fields(e["fieldsV1"]))

    def job_list(self, namespace: str) -> list[dict]:
        with self.lock:
            return [copy.deepcopy(j) for (ns, _), j in sorted(self.jobs.items()) if ns == namespace]

    def secret(self, namespace: str, name: str) -> dict | None:
        with self.lock:
            return copy.deepcopy(self.secrets.get((namespace, name)))

    def set_job_status(self, namespace: str, name: str, status: dict) -> None:
        """Write a Job's status as its controller would (its pods succeeded or failed)."""
        with self.lock:
            job = copy.deepcopy(self.jobs[(namespace, name)])
            job["status"] = status
            self._validate(job)
            self.rv += 1
            job["metadata"]["resourceVersion"] = str(self.rv)
            self.jobs[(namespace, name)] = job

    def compact(self) -> None:
        """Forget the watch history, as etcd compaction does: older versions get 410 Gone."""
        with self.lock:
            self.history.clear()
            self.compacted_rv = self.rv

    def node(self, name: str) -> dict:
        with self.lock:
            return copy.deepcopy(self.nodes[name])

    def writes(self, user_agent: str | None = None) -> list[tuple[str, str, str]]:
        return [r for r in self.requests if r[0] in ("POST", "PUT", "PATCH", "DELETE")
                and (user_agent is None or r[2] == user_agent)]

    # -- storage ------------------------------------------------------------------------
    def _store_node(self, name: str, node: dict, kind: str) -> dict:
        self._validate(node)
        self.rv += 1
        node["metadata"]["resourceVersion"] = str(self.rv)
        self.nodes[name] = node
        self._record(kind, node)
        return node

    def _record(self, kind: str, node: dict) -> None:
        self.history.append((self.rv, kind, copy.deepcopy(node)))
        if len(self.history) > self.history_size:
            dropped = self.history.pop(0)
            self.compacted_rv = dropped[0]
        self.lock.notify_all()

    def _validate(self, obj: dict) -> None:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path)) or "<root>"
            msg = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}: {where}: {exc.message}"
            self.invalid.append(msg)
            raise ApiError(422, "Invalid", msg) from None

    # -- request handling ----------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict, body: bytes, content_type: str, user_agent: str = ""):
        with self.lock:
            if self._fail:
                code = self._fail.pop(0)
                raise ApiError(code, "InternalError" if code >= 500 else "TooManyRequests", "injected failure")
        parts = [p for p in path.split("/") if p]
        doc = json.loads(body) if body else None
        if parts[:2] == ["api", "v1"]:
            rest = parts[2:]
            if rest[:1] == ["nodes"]:
                return self._nodes(method, rest[1:], {**query, "_manager": query.get("fieldManager")
                                                      or user_agent.split("/")[0] or "unknown"}, doc, content_type)
            if rest == ["pods"]:
                return self._list_pods(None, query)
            if rest[:1] == ["namespaces"] and len(rest) >= 3:
                ns, what = rest[1], rest[2:]
                if what == ["pods"]:
                    return self._list_pods(ns, query)
                if len(what) == 3 and what[0] == "pods" and what[2] == "eviction" and method == "POST":
                    return self._evict(ns, what[1], doc)
                if what == ["events"] and method == "POST":
                    return self._create_event(doc)
                if what[:1] == ["secrets"]:
                    return self._namespaced(self.secrets, "Secret", "v1", method, ns, what[1:], doc, query)
        if parts[:3] == ["apis", "batch", "v1"] and parts[3:4] == ["namespaces"] and parts[5:6] == ["jobs"]:
            return self._namespaced(self.jobs, "Job", "batch/v1", method, parts[4], parts[6:], doc, query)
        if parts[:4] == ["apis", "resource.k8s.io", DRA_VERSION, "devicetaintrules"]:
            return self._namespaced(self.device_taint_rules, "DeviceTaintRule", f"resource.k8s.io/{DRA_VERSION}",
                                    method, None, parts[4:], doc, query)
        if parts[:3] == ["apis", "events.k8s.io", "v1"] and parts[3:4] == ["namespaces"] and parts[5:] == ["events"]:
            return self._create_event(doc, "events.k8s.io/v1")
        if parts[:3] == ["apis", "coordination.k8s.io", "v1"] and parts[3:4] == ["namespaces"] \
                and parts[5:6] == ["leases"]:
            return self._leases(method, parts[4], parts[6] if len(parts) > 6 else None, doc)
        raise ApiError(404, "NotFound", f"the server could not find the requested resource ({method} {path})")

    def _nodes(self, method, rest, query, doc, content_type):
        if not rest:
            if method != "GET":
                raise ApiError(405, "MethodNotAllowed", method)
            if query.get("watch") in ("true", "1"):
                return ("watch", query)
            with self.lock:
                items = [copy.deepcopy(n) for n in self.nodes.values() if _selected(n, query.get("labelSelector"))]
                return 200, {"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)},
                             "items": items}
        name, sub = rest[0], rest[1:]
        with self.lock:
            if name not in self.nodes:
                raise ApiError(404, "NotFound", f'nodes "{name}" not found')
            current = self.nodes[name]
            if method == "GET":
                return 200, copy.deepcopy(current)
            if method == "DELETE":
                self.nodes.pop(name)
                self.rv += 1
                self._record("DELETED", current)
                return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
            if method == "PUT":
                _check_version(doc, current, name)
                new = copy.deepcopy(doc)
                if sub == ["status"]:  # the status subresource changes status only
                    new = {**copy.deepcopy(current), "status": doc.get("status", {})}
                else:
                    new["status"] = copy.deepcopy(current.get("status", {}))
                new["metadata"] = {**new.get("metadata", {}), "uid": current["metadata"]["uid"]}
                if sub != ["status"]:
                    _manage(current, new, query["_manager"])
                return 200, copy.deepcopy(self._store_node(name, new, "MODIFIED"))
            if method == "PATCH":
                new = _apply_patch(current, doc, content_type, name)
                if sub == ["status"]:
                    new = {**copy.deepcopy(current), "status": new.get("status", {})}
                else:
                    new["status"] = copy.deepcopy(current.get("status", {}))
                    _manage(current, new, query["_manager"])
                return 200, copy.deepcopy(self._store_node(name, new, "MODIFIED"))
        raise ApiError(405, "MethodNotAllowed", method)

    def _namespaced(self, store: dict, kind: str, api_version: str, method: str, ns: str | None, rest: list, doc,
                    query):
        """Create, list, get (and its status) and delete of a namespaced kind (ns None: a
        cluster-scoped one), as the API does them."""
        plural = kind.lower() + "s"
        with self.lock:
            if not rest and method == "POST":
                doc = {"apiVersion": api_version, "kind": kind, **doc}
                meta = doc.setdefault("metadata", {})
                if meta.get("namespace", ns) != ns:
                    raise ApiError(400, "BadRequest", "the namespace of the object does not match the request")
                self._validate(doc)
                name = meta.get("name")
                if (ns, name) in store:
                    raise ApiError(409, "AlreadyExists", f'{plural} "{name}" already exists')
                self.rv += 1
                meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=str(self.rv))
                if ns is not None:  # None: a cluster-scoped kind
                    meta["namespace"] = ns
                store[(ns, name)] = doc
                return 201, copy.deepcopy(doc)
            if not rest and method == "GET":
                items = [copy.deepcopy(o) for (n, _), o in sorted(store.items())
                         if n == ns and _selected(o, query.get("labelSelector"))]
                return 200, {"kind": f"{kind}List", "apiVersion": api_version,
                             "metadata": {"resourceVersion": str(self.rv)}, "items": items}
            if len(rest) == 1 or (rest[1:] == ["status"] and method == "GET"):
                if (ns, rest[0]) not in store:
                    raise ApiError(404, "NotFound", f'{plural} "{rest[0]}" not found')
                if method == "GET":
                    return 200, copy.deepcopy(store[(ns, rest[0])])
                if method == "DELETE":
                    store.pop((ns, rest[0]))
                    self.rv += 1
                    return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        raise ApiError(405, "MethodNotAllowed", f"{method} {plural}/{'/'.join(rest)}")

    def _list_pods(self, namespace, query):
        node = None
        for clause in (query.get("fieldSelector") or "").split(","):
            if clause.startswith("spec.nodeName="):
                node = clause.split("=", 1)[1]
            elif clause:
                raise ApiError(400, "BadRequest", f"field selector not supported here: {clause}")
        with self.lock:
            items = [copy.deepcopy(p) for (ns, _), p in sorted(self.pods.items())
                     if (namespace is None or ns == namespace) and (node is None or p["spec"]["nodeName"] == node)]
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)},
                         "items": items}

    def _evict(self, namespace, name, doc):
        # Like the API server, take the kind from the endpoint when the body leaves it out.
        doc = {"apiVersion": "policy/v1", "kind": "Eviction", **doc}
        self._validate(doc)
        with self.lock:
            if (namespace, name) not in self.pods:
                raise ApiError(404, "NotFound", f'pods "{name}" not found')
            if (namespace, name) in self.pdb_protected:
                raise ApiError(429, "TooManyRequests",
                               "Cannot evict pod as it would violate the pod's disruption budget.")
            self.pods.pop((namespace, name))
            self.rv += 1
        return 201, {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}

    def _create_event(self, doc, api_version: str = "v1"):
        doc = {"apiVersion": api_version, "kind": "Event", **doc}
        self._validate(doc)
        with self.lock:
            meta = doc.get("metadata") or {}
            if any((e["metadata"].get("namespace"), e["metadata"].get("name")) == (meta.get("namespace"), meta.get("name"))
                   for e in self.events):
                raise ApiError(409, "AlreadyExists", f'events "{meta.get("name")}" already exists')
            self.rv += 1
            stored = copy.deepcopy(doc)
            stored.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
            self.events.append(stored)
        return 201, stored

    def _leases(self, method, namespace, name, doc):
        with self.lock:
            if method in ("POST", "PUT"):
                doc = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", **doc}
            if method == "POST":
                self._validate(doc)
                key = (namespace, doc["metadata"]["name"])
                if key in self.leases:
                    raise ApiError(409, "AlreadyExists", f'leases.coordination.k8s.io "{key[1]}" already exists')
                self.rv += 1
                stored = copy.deepcopy(doc)
                stored["metadata"].update(namespace=namespace, resourceVersion=str(self.rv))
                self.leases[key] = stored
                return 201, copy.deepcopy(stored)
            key = (namespace, name)
            if key not in self.leases:
                raise ApiError(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found')
            if method == "GET":
                return 200, copy.deepcopy(self.leases[key])
            if method == "PUT":
                self._validate(doc)
                _check_version(doc, self.leases[key], name)
                self.rv += 1
                stored = copy.deepcopy(doc)
                stored["metadata"].update(namespace=namespace, resourceVersion=str(self.rv))
                self.leases[key] = stored
                return 200, copy.deepcopy(stored)
        raise ApiError(405, "MethodNotAllowed", method)

    def watch_lines(self, query: dict, alive):
        """Yield watch events (JSON lines) after the asked resourceVersion until the timeout."""
        since = int(query.get("resourceVersion") or 0)
        deadline = time.monotonic() + min(float(query.get("timeoutSeconds") or 5), 30)
        with self.lock:
            if since and since < self.compacted_rv:
                yield json.dumps({"type": "ERROR", "object": ApiError(
                    410, "Expired", f"too old resource version: {since} ({self.compacted_rv})").status()})
                return
            if not since:  # no version: the current state as ADDED, then changes
                backlog = [(self.rv, "ADDED", copy.deepcopy(n)) for n in self.nodes.values()]
                since = self.rv
            else:
                backlog = []
        for _, kind, node in backlog:
            if _selected(node, query.get("labelSelector")):
                yield json.dumps({"type": kind, "object": node})
        while alive() and time.monotonic() < deadline:
            with self.lock:
                fresh = [(rv, k, copy.deepcopy(n)) for rv, k, n in self.history if rv > since]
                if not fresh:
                    self.lock.wait(min(0.2, max(0.0, deadline - time.monotonic())))
                    continue
            for rv, kind, node in fresh:
                since = rv
                if _selected(node, query.get("labelSelector")):
                    yield json.dumps({"type": kind, "object": node})


def _handler(api: FakeApiServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: tests assert on api.requests instead
            pass

        def _serve(self):
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            api.requests.append((self.command, url.path, self.headers.get("User-Agent", "")))
            try:
                result = api.handle(self.command, url.path, query, body, self.headers.get("Content-Type", ""),
                                    self.headers.get("User-Agent", ""))
            except ApiError as exc:
                return self._json(exc.code, exc.status())
            except (ValueError, KeyError, TypeError) as exc:
                return self._json(400, ApiError(400, "BadRequest", f"bad request: {exc!r}").status())
            if result[0] == "watch":
                return self._watch(result[1])
            self._json(*result)

        def _json(self, code, doc):
            data = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _watch(self, query):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            alive = lambda: api._server is not None and not getattr(api._server, "_BaseServer__shutdown_request", False)  # noqa: E731
            try:
                for line in api.watch_lines(query, alive):
                    data = (line + "\n").encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    return Handler


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _selected(obj: dict, selector: str | None) -> bool:
    if not selector:
        return True
    labels = obj["metadata"].get("labels") or {}
    for clause in selector.split(","):
        if "!=" in clause:
            key, value = clause.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in clause:
            key, value = clause.split("=", 1)
            if labels.get(key.rstrip("=")) != value:
                return False
        elif clause and clause not in labels:
            return False
    return True


def _owned_leaves(obj: dict) -> dict[tuple, object]:
    """The fields a manager can own: spec, labels and annotations, down to scalars and whole lists."""
    leaves: dict[tuple, object] = {}

    def walk(value, path):
        if isinstance(value, dict) and value:
            for key, child in value.items():
                walk(child, path + (key,))
        else:
            leaves[path] = value

    walk(obj.get("spec") or {}, ("spec",))
    for part in ("labels", "annotations"):
        walk((obj.get("metadata") or {}).get(part) or {}, ("metadata", part))
    return {p: v for p, v in leaves.items() if v != {}}


def _decode_fields(fields: dict, path: tuple = ()) -> set[tuple]:
    out = set()
    for key, child in fields.items():
        here = path + (key[2:],)
        out |= _decode_fields(child, here) if child else {here}
    return out


def _encode_fields(paths: set[tuple]) -> dict:
    tree: dict = {}
    for path in sorted(paths):
        node = tree
        for part in path:
            node = node.setdefault(f"f:{part}", {})
    return tree


def _manage(old: dict, new: dict, manager: str) -> None:
    """Update `new`'s managedFields for a write by `manager` that turned `old` into `new`."""
    before, after = _owned_leaves(old), _owned_leaves(new)
    changed = {p for p, v in after.items() if p not in before or before[p] != v}
    removed = set(before) - set(after)
    owners = {e["manager"]: _decode_fields(e["fieldsV1"])
              for e in (old.get("metadata") or {}).get("managedFields", [])}
    for paths in owners.values():
        paths -= changed | removed
    owners.setdefault(manager, set()).update(changed)
    previous = {e["manager"]: e for e in (old.get("metadata") or {}).get("managedFields", [])}
    new["metadata"]["managedFields"] = [
        {"manager": m, "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1",
         "time": previous[m]["time"] if m in previous and m != manager else _now(), "fieldsV1": _encode_fields(paths)}
        for m, paths in owners.items() if paths]


def _check_version(doc: dict, current: dict, name: str) -> None:
    wanted = (doc.get("metadata") or {}).get("resourceVersion")
    if wanted and wanted != current["metadata"]["resourceVersion"]:
        raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on "{name}": the object has been modified; '
                                        "please apply your changes to the latest version and try again")


def _apply_patch(current: dict, patch, content_type: str, name: str) -> dict:
    kind = content_type.split(";")[0].strip()
    if kind == "application/json-patch+json":
        return _json_patch(copy.deepcopy(current), patch)
    if kind not in ("application/strategic-merge-patch+json", "application/merge-patch+json"):
        raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type {content_type!r}")
    _check_version(patch, current, name)
    return _merge(copy.deepcopy(current), patch, (), strategic=kind.startswith("application/strategic"))


def _merge(target, patch, path: tuple, strategic: bool):
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return copy.deepcopy(patch)
    for key, value in patch.items():
        here = path + (key,)
        if value is None:
            target.pop(key, None)
        elif strategic and here in MERGE_KEYS and isinstance(value, list) and isinstance(target.get(key), list):
            merge_key = MERGE_KEYS[here]
            merged = {item[merge_key]: item for item in target[key]}
            for item in value:
                merged[item[merge_key]] = _merge(merged.get(item[merge_key], {}), item, here, strategic)
            target[key] = list(merged.values())
        else:
            target[key] = _merge(target.get(key), value, here, strategic) if isinstance(value, dict) \
                else copy.deepcopy(value)
    return target


def _json_patch(doc: dict, ops: list) -> dict:
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        if op["op"] == "test":
            value = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if value != op["value"]:
                raise ApiError(422, "Invalid", f"the test of {op['path']} failed")
        elif op["op"] in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif op["op"] == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                if op["op"] == "replace" and last not in parent:
                    raise ApiError(422, "Invalid", f"replace of a missing path {op['path']}")
                parent[last] = op["value"]
        elif op["op"] == "remove":
            if isinstance(parent, list):
                parent.pop(int(last))
            else:
                if last not in parent:
                    raise ApiError(422, "Invalid", f"remove of a missing path {op['path']}")
                parent.pop(last)
        else:
            raise ApiError(422, "Invalid", f"unsupported JSON patch op {op['op']!r}")
    return doc
