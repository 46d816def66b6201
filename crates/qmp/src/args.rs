//! Command arguments checked the way QEMU's QAPI input visitor checks them: members
//! are taken by name, a missing or mistyped member is an error naming it, and a member
//! no one took is "unexpected".

use serde_json::{Map, Value};

use crate::error::QmpError;

/// The `arguments` of one request, consumed member by member.
#[derive(Debug, Default)]
pub struct Args {
    members: Map<String, Value>,
}

fn bad_type(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

fn missing(name: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' is missing"))
}

impl Args {
    /// Wraps the members of an `arguments` object.
    pub fn new(members: Map<String, Value>) -> Self {
        Args { members }
    }

    /// Takes an optional member as raw JSON.
    pub fn value(&mut self, name: &str) -> Option<Value> {
        self.members.remove(name)
    }

    /// Takes an optional string member.
    pub fn opt_str(&mut self, name: &str) -> Result<Option<String>, QmpError> {
        match self.members.remove(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(bad_type(name, "string")),
        }
    }

    /// Takes a required string member.
    pub fn str(&mut self, name: &str) -> Result<String, QmpError> {
        self.opt_str(name)?.ok_or_else(|| missing(name))
    }

    /// Takes an optional boolean member.
    pub fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, QmpError> {
        match self.members.remove(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(bad_type(name, "boolean")),
        }
    }

    /// Takes an optional signed 64-bit integer member.
    pub fn opt_i64(&mut self, name: &str) -> Result<Option<i64>, QmpError> {
        match self.members.remove(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(v) => Ok(Some(v)),
                None if n.is_u64() => Err(QmpError::generic(format!(
                    "Parameter '{name}' expects int64"
                ))),
                None => Err(bad_type(name, "integer")),
            },
            Some(_) => Err(bad_type(name, "integer")),
        }
    }

    /// Takes a required signed 64-bit integer member.
    pub fn i64(&mut self, name: &str) -> Result<i64, QmpError> {
        self.opt_i64(name)?.ok_or_else(|| missing(name))
    }

    /// Takes an optional member that must be one of `values` (a QAPI enum).
    pub fn opt_enum(
        &mut self,
        name: &str,
        values: &[&'static str],
    ) -> Result<Option<&'static str>, QmpError> {
        match self.opt_str(name)? {
            None => Ok(None),
            Some(s) => values
                .iter()
                .find(|v| **v == s)
                .map(|v| Some(*v))
                .ok_or_else(|| {
                    QmpError::generic(format!("Parameter '{name}' does not accept value '{s}'"))
                }),
        }
    }

    /// Takes a required array member.
    pub fn array(&mut self, name: &str) -> Result<Vec<Value>, QmpError> {
        match self.members.remove(name) {
            None => Err(missing(name)),
            Some(Value::Array(a)) => Ok(a),
            Some(_) => Err(bad_type(name, "array")),
        }
    }

    /// Takes an optional array member.
    pub fn opt_array(&mut self, name: &str) -> Result<Option<Vec<Value>>, QmpError> {
        match self.members.remove(name) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(bad_type(name, "array")),
        }
    }

    /// Fails if a member was not taken (QEMU checks this after the known ones).
    pub fn finish(self) -> Result<(), QmpError> {
        match self.members.keys().next() {
            Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }

    /// The names of the members not taken yet.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.members.keys().map(String::as_str)
    }

    /// Takes what is left (for commands whose arguments are a flat struct).
    pub fn into_members(self) -> Map<String, Value> {
        self.members
    }
}

/// Arguments of an element of an array member (e.g. `capabilities[0]`).
pub fn object(name: &str, v: Value) -> Result<Args, QmpError> {
    match v {
        Value::Object(m) => Ok(Args::new(m)),
        _ => Err(bad_type(name, "object")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Args {
        match v {
            Value::Object(m) => Args::new(m),
            _ => unreachable!("test input is an object"),
        }
    }

    #[test]
    fn qapi_style_errors() {
        let mut a = args(json!({"uri": 5, "x": 1}));
        assert_eq!(
            a.str("uri").unwrap_err().desc,
            "Invalid parameter type for 'uri', expected: string"
        );
        let mut a = args(json!({}));
        assert_eq!(a.str("uri").unwrap_err().desc, "Parameter 'uri' is missing");
        let mut a = args(json!({"uri": "tcp:x:1", "x": 1}));
        assert_eq!(a.str("uri").unwrap(), "tcp:x:1");
        assert_eq!(a.finish().unwrap_err().desc, "Parameter 'x' is unexpected");
        let mut a = args(json!({"mode": "nope"}));
        assert_eq!(
            a.opt_enum("mode", &["a", "b"]).unwrap_err().desc,
            "Parameter 'mode' does not accept value 'nope'"
        );
        let mut a = args(json!({"n": 1.5}));
        assert!(a.opt_i64("n").is_err());
    }
}
