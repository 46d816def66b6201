//! The QAPI types of Ferry's commands and events, and `query-qmp-schema`'s
//! introspection document built from them (QEMU's `SchemaInfo`: meta-types
//! `command`, `event`, `object`, `enum`, `builtin`, `array`). The dispatcher's table
//! names each command's argument and return types here, so the document describes
//! exactly what is answered.

use std::collections::BTreeMap;

use migration_core::{Capability, MigrationParameters};
use serde_json::{json, Value};

/// A QAPI type.
#[derive(Clone, Copy, Debug)]
pub enum Ty {
    /// A builtin: `str`, `int`, `bool`, `number`, `any`, `null`.
    Builtin(&'static str),
    /// An enum: its name and values.
    Enum(&'static str, &'static [&'static str]),
    /// A struct: its name and members.
    Object(&'static str, Members),
    /// An array of the element type.
    Array(&'static Ty),
    /// `MigrationCapability`: an enum of every [`Capability`] ([`Capability::ALL`]).
    Capabilities,
}

/// A struct's members.
#[derive(Clone, Copy, Debug)]
pub enum Members {
    /// Listed here.
    Fixed(&'static [Member]),
    /// The migration parameters (every member optional), from
    /// [`MigrationParameters`]' own serialization, so a new parameter shows at once.
    Parameters,
}

/// One member of a struct.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    /// The name.
    pub name: &'static str,
    /// The type.
    pub ty: Ty,
    /// Optional (`*name` in QAPI).
    pub optional: bool,
}

/// A required member.
pub const fn req(name: &'static str, ty: Ty) -> Member {
    Member {
        name,
        ty,
        optional: false,
    }
}

/// An optional member.
pub const fn opt(name: &'static str, ty: Ty) -> Member {
    Member {
        name,
        ty,
        optional: true,
    }
}

/// `str`.
pub const STR: Ty = Ty::Builtin("str");
/// `int`.
pub const INT: Ty = Ty::Builtin("int");
/// `bool`.
pub const BOOL: Ty = Ty::Builtin("bool");
/// `number`.
pub const NUMBER: Ty = Ty::Builtin("number");
/// `any`.
pub const ANY: Ty = Ty::Builtin("any");
/// The empty struct (no arguments, or `{}` returned); QEMU names it `0`.
pub const EMPTY: Ty = Ty::Object("0", Members::Fixed(&[]));

/// A command's argument and return types.
#[derive(Clone, Copy, Debug)]
pub struct Signature {
    /// The arguments (a struct; [`EMPTY`] for none).
    pub args: Ty,
    /// What it returns.
    pub ret: Ty,
}

/// An event and its data (a struct; [`EMPTY`] for none).
pub const EVENTS: &[(&str, Ty)] = &[
    ("STOP", EMPTY),
    ("RESUME", EMPTY),
    (
        "MIGRATION",
        Ty::Object(
            "MIGRATION_arg",
            Members::Fixed(&[req("status", MIGRATION_STATUS)]),
        ),
    ),
    (
        "MIGRATION_PASS",
        Ty::Object("MIGRATION_PASS_arg", Members::Fixed(&[req("pass", INT)])),
    ),
];

/// `MigrationStatus`: the values Ferry reports.
pub const MIGRATION_STATUS: Ty = Ty::Enum(
    "MigrationStatus",
    &[
        "none",
        "setup",
        "cancelling",
        "cancelled",
        "active",
        "completed",
        "failed",
        "pre-switchover",
        "device",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover",
    ],
);

/// `RunState`: the values Ferry reports.
pub const RUN_STATE: Ty = Ty::Enum(
    "RunState",
    &[
        "finish-migrate",
        "inmigrate",
        "paused",
        "postmigrate",
        "running",
        "shutdown",
    ],
);

/// `MigrationCapability`.
pub const MIGRATION_CAPABILITY: Ty = Ty::Capabilities;

/// `MigrationCapabilityStatus`.
pub const CAPABILITY_STATUS: Ty = Ty::Object(
    "MigrationCapabilityStatus",
    Members::Fixed(&[req("capability", MIGRATION_CAPABILITY), req("state", BOOL)]),
);

/// `MigrateSetParameters` (the arguments of `migrate-set-parameters`).
pub const SET_PARAMETERS: Ty = Ty::Object("MigrateSetParameters", Members::Parameters);

/// `MigrationParameters` (`query-migrate-parameters`).
pub const PARAMETERS: Ty = Ty::Object("MigrationParameters", Members::Parameters);

/// `MigrationStats` (`query-migrate`'s `ram`).
pub const MIGRATION_STATS: Ty = Ty::Object(
    "MigrationStats",
    Members::Fixed(&[
        req("transferred", INT),
        req("remaining", INT),
        req("total", INT),
        req("duplicate", INT),
        req("normal", INT),
        req("normal-bytes", INT),
        req("dirty-pages-rate", INT),
        req("mbps", NUMBER),
        req("dirty-sync-count", INT),
        req("postcopy-requests", INT),
        req("page-size", INT),
        req("multifd-bytes", INT),
        req("pages-per-second", INT),
        req("precopy-bytes", INT),
        req("downtime-bytes", INT),
        req("postcopy-bytes", INT),
        req("dirty-sync-missed-zero-copy", INT),
    ]),
);

/// `MigrationInfo` (`query-migrate`); `x-ferry` is Ferry's own breakdown.
pub const MIGRATION_INFO: Ty = Ty::Object(
    "MigrationInfo",
    Members::Fixed(&[
        opt("status", MIGRATION_STATUS),
        opt("ram", MIGRATION_STATS),
        opt("total-time", INT),
        opt("expected-downtime", INT),
        opt("downtime", INT),
        opt("setup-time", INT),
        opt("cpu-throttle-percentage", INT),
        opt("dirty-limit-throttle-time-per-round", INT),
        opt("dirty-limit-ring-full-time", INT),
        opt("error-desc", STR),
        opt("socket-address", Ty::Array(&SOCKET_ADDRESS)),
        opt("x-ferry", ANY),
    ]),
);

/// QEMU's `SocketAddress` (a union on `type`, flattened: `inet` has `host` and
/// `port`, `unix` has `path`).
pub const SOCKET_ADDRESS: Ty = Ty::Object(
    "SocketAddress",
    Members::Fixed(&[
        req("type", Ty::Enum("SocketAddressType", &["inet", "unix"])),
        opt("host", STR),
        opt("port", STR),
        opt("path", STR),
    ]),
);

/// QEMU's `MigrationThreadInfo` (`query-migrationthreads`).
pub const MIGRATION_THREAD_INFO: Ty = Ty::Object(
    "MigrationThreadInfo",
    Members::Fixed(&[req("name", STR), req("thread-id", INT)]),
);

/// QEMU's `block-bitmap-mapping` parameter: `[BitmapMigrationNodeAlias]`.
pub const BITMAP_MAPPING: Ty = Ty::Array(&Ty::Object(
    "BitmapMigrationNodeAlias",
    Members::Fixed(&[
        req("node-name", STR),
        req("alias", STR),
        req(
            "bitmaps",
            Ty::Array(&Ty::Object(
                "BitmapMigrationBitmapAlias",
                Members::Fixed(&[
                    req("name", STR),
                    req("alias", STR),
                    opt(
                        "transform",
                        Ty::Object(
                            "BitmapMigrationBitmapAliasTransform",
                            Members::Fixed(&[opt("persistent", BOOL)]),
                        ),
                    ),
                ]),
            )),
        ),
    ]),
));

/// Checks `v` against `ty` as QEMU's input visitor does, with its texts naming the
/// member's path (`block-bitmap-mapping[0].alias`): a member of the wrong type or
/// missing first, in declaration order, then one the struct does not have. Enums,
/// `any` and the migration parameters are accepted as they are (their own parsers
/// check them).
pub(crate) fn check_value(path: &str, ty: &Ty, v: &Value) -> Result<(), crate::error::QmpError> {
    use crate::error::QmpError;
    let bad = |expected: &str| {
        Err(QmpError::generic(format!(
            "Invalid parameter type for '{path}', expected: {expected}"
        )))
    };
    match ty {
        Ty::Builtin("str") if !v.is_string() => bad("string"),
        Ty::Builtin("bool") if !v.is_boolean() => bad("boolean"),
        Ty::Builtin("int") if !(v.is_i64() || v.is_u64()) => bad("integer"),
        Ty::Array(elem) => {
            let Some(items) = v.as_array() else {
                return bad("array");
            };
            for (i, item) in items.iter().enumerate() {
                check_value(&format!("{path}[{i}]"), elem, item)?;
            }
            Ok(())
        }
        Ty::Object(_, Members::Fixed(members)) => {
            let Some(obj) = v.as_object() else {
                return bad("object");
            };
            for m in *members {
                let at = format!("{path}.{}", m.name);
                match obj.get(m.name) {
                    Some(v) => check_value(&at, &m.ty, v)?,
                    None if !m.optional => {
                        return Err(QmpError::generic(format!("Parameter '{at}' is missing")))
                    }
                    None => {}
                }
            }
            if let Some(k) = obj.keys().find(|k| !members.iter().any(|m| m.name == *k)) {
                return Err(QmpError::generic(format!(
                    "Parameter '{path}.{k}' is unexpected"
                )));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The builtins' JSON types.
fn json_type(builtin: &str) -> &'static str {
    match builtin {
        "str" => "string",
        "int" => "int",
        "bool" => "boolean",
        "number" => "number",
        "null" => "null",
        _ => "value",
    }
}

/// The members of a struct, resolved.
pub fn members(m: Members) -> Vec<(String, Ty, bool)> {
    match m {
        Members::Fixed(l) => l
            .iter()
            .map(|m| (m.name.to_owned(), m.ty, m.optional))
            .collect(),
        Members::Parameters => {
            let v = serde_json::to_value(MigrationParameters::default()).unwrap_or_default();
            v.as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| {
                            let ty = match (k.as_str(), v) {
                                ("multifd-compression", _) => {
                                    Ty::Enum("MultiFDCompression", &["none", "zstd"])
                                }
                                ("mode", _) => Ty::Enum("MigMode", &["normal"]),
                                (_, Value::Bool(_)) => BOOL,
                                (_, Value::String(_)) => STR,
                                _ => INT,
                            };
                            (k.clone(), ty, true)
                        })
                        .chain([("block-bitmap-mapping".to_owned(), BITMAP_MAPPING, true)])
                        .collect()
                })
                .unwrap_or_default()
        }
    }
}

/// The schema name of a type.
pub fn type_name(ty: &Ty) -> String {
    match ty {
        Ty::Builtin(n) | Ty::Enum(n, _) | Ty::Object(n, _) => (*n).to_owned(),
        Ty::Capabilities => "MigrationCapability".to_owned(),
        Ty::Array(e) => format!("[{}]", type_name(e)),
    }
}

/// Adds `ty` and every type it refers to.
fn collect(ty: &Ty, out: &mut BTreeMap<String, Value>) {
    let name = type_name(ty);
    if out.contains_key(&name) {
        return;
    }
    match ty {
        Ty::Builtin(n) => {
            out.insert(
                name,
                json!({"name": n, "meta-type": "builtin", "json-type": json_type(n)}),
            );
        }
        Ty::Enum(n, values) => {
            out.insert(name, enum_info(n, values.iter().map(|v| (*v).to_owned())));
        }
        Ty::Capabilities => {
            let values = Capability::ALL.iter().map(|c| c.name());
            out.insert(name.clone(), enum_info(&name, values));
        }
        Ty::Object(n, m) => {
            let ms = members(*m);
            out.insert(name, Value::Null);
            let list: Vec<Value> = ms
                .iter()
                .map(|(mname, mty, optional)| {
                    collect(mty, out);
                    let mut j = json!({"name": mname, "type": type_name(mty)});
                    if *optional {
                        j["default"] = Value::Null;
                    }
                    j
                })
                .collect();
            out.insert(
                (*n).to_owned(),
                json!({"name": n, "meta-type": "object", "members": list}),
            );
        }
        Ty::Array(e) => {
            collect(e, out);
            out.insert(
                name.clone(),
                json!({"name": name, "meta-type": "array", "element-type": type_name(e)}),
            );
        }
    }
}

fn enum_info(name: &str, values: impl Iterator<Item = String>) -> Value {
    let values: Vec<String> = values.collect();
    let members: Vec<Value> = values.iter().map(|v| json!({"name": v})).collect();
    json!({"name": name, "meta-type": "enum", "members": members, "values": values})
}

/// The introspection document for `commands` (name and signature) and [`EVENTS`]:
/// the commands, then the events, then every type they refer to.
pub fn document<'a>(commands: impl Iterator<Item = (&'a str, Signature)>) -> Value {
    let mut types = BTreeMap::new();
    let mut list = Vec::new();
    for (name, sig) in commands {
        collect(&sig.args, &mut types);
        collect(&sig.ret, &mut types);
        list.push(json!({
            "name": name,
            "meta-type": "command",
            "arg-type": type_name(&sig.args),
            "ret-type": type_name(&sig.ret),
        }));
    }
    for (name, data) in EVENTS {
        collect(data, &mut types);
        list.push(json!({"name": name, "meta-type": "event", "arg-type": type_name(data)}));
    }
    list.extend(types.into_values());
    Value::Array(list)
}

/// The names a struct type accepts as members (`None` when it is not a struct).
pub fn member_names(ty: &Ty) -> Option<Vec<String>> {
    match ty {
        Ty::Object(_, m) => Some(members(*m).into_iter().map(|(n, _, _)| n).collect()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS_ARG: &[Member] = &[req("capabilities", Ty::Array(&CAPABILITY_STATUS))];

    #[test]
    fn migration_status_lists_every_status() {
        use stats::MigrationStatus as S;
        let every = [
            S::None,
            S::Setup,
            S::Active,
            S::Device,
            S::Completed,
            S::Failed,
            S::Cancelling,
            S::Cancelled,
            S::PostcopyActive,
            S::PostcopyPaused,
            S::PostcopyRecover,
            S::PreSwitchover,
        ];
        // Exhaustive: a status added to stats fails to compile here until listed.
        for s in every {
            match s {
                S::None
                | S::Setup
                | S::Active
                | S::Device
                | S::Completed
                | S::Failed
                | S::Cancelling
                | S::Cancelled
                | S::PostcopyActive
                | S::PostcopyPaused
                | S::PostcopyRecover
                | S::PreSwitchover => {}
            }
        }
        let Ty::Enum(_, values) = MIGRATION_STATUS else {
            panic!("MigrationStatus is an enum");
        };
        for s in every {
            assert!(values.contains(&s.as_str()), "{} is not listed", s.as_str());
        }
    }

    #[test]
    fn every_reference_resolves() {
        let doc = document(
            [(
                "migrate-set-capabilities",
                Signature {
                    args: Ty::Object("x", Members::Fixed(CAPS_ARG)),
                    ret: EMPTY,
                },
            )]
            .into_iter(),
        );
        let list = doc.as_array().expect("a list");
        let names: Vec<&str> = list.iter().filter_map(|e| e["name"].as_str()).collect();
        for e in list {
            for key in ["arg-type", "ret-type", "element-type"] {
                if let Some(t) = e[key].as_str() {
                    assert!(names.contains(&t), "{key} {t} of {e}");
                }
            }
            for m in e["members"].as_array().into_iter().flatten() {
                if let Some(t) = m["type"].as_str() {
                    assert!(names.contains(&t), "member {m}");
                }
            }
        }
        let caps = list
            .iter()
            .find(|e| e["name"] == "MigrationCapability")
            .expect("the enum");
        assert_eq!(caps["meta-type"], "enum");
        assert_eq!(caps["values"].as_array().map(Vec::len), Some(23));
    }
}
