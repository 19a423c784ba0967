// `tenant-map`, written in JavaScript against the same WIT as the Rust examples
// (componentized with `jco componentize`; see scripts/build-js-policies).
//
// Config: {"tenants": {"acme": "acme/support"}, "default": "shared/general", "deny": ["mallory"]}
// A denied tenant is refused (403). The base model, or a loaded adapter named explicitly, is
// routed as asked; any other model goes to the tenant's adapter, else the default, else 404.
import { config } from "switchyard:policy/host@0.1.2";

function route(adapter) {
  return { tag: "route", val: { adapter, backend: undefined, priority: 0 } };
}

function reject(status, code, message) {
  return { tag: "reject", val: { status, code, message } };
}

export function decide(req) {
  let cfg;
  try {
    cfg = JSON.parse(config());
  } catch (e) {
    throw `bad policy configuration: ${e}`;
  }
  const tenants = cfg.tenants ?? {};
  if ((cfg.deny ?? []).includes(req.tenant)) {
    return reject(403, "tenant_denied", `tenant ${req.tenant} may not use this service`);
  }
  if (req.model === req.baseModel) {
    return route(undefined);
  }
  if (req.adapters.some((a) => a.name === req.model)) {
    return route(req.model);
  }
  const adapter = tenants[req.tenant] ?? cfg.default;
  if (adapter === undefined) {
    return reject(404, "model_not_found", `no adapter is configured for tenant ${req.tenant}`);
  }
  return route(adapter);
}
