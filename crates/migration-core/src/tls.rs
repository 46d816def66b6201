//! The TLS objects a VMM's monitor creates (QEMU's `object-add` of
//! `tls-creds-x509` and `authz-list`) and how the migration parameters `tls-creds`,
//! `tls-hostname` and `tls-authz` name them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use transport::{TlsAuthz, TlsConfig, TlsCreds, TlsEndpoint};

use crate::{Error, MigrationParameters, Result};

/// One object of the table.
#[derive(Clone, Debug)]
pub enum TlsObject {
    /// `tls-creds-x509`.
    Creds(TlsCreds),
    /// `authz-list`.
    Authz(TlsAuthz),
}

/// The objects by id, shared by a source and its monitor. Cheap to clone.
#[derive(Clone, Default)]
pub struct TlsObjects {
    map: Arc<Mutex<HashMap<String, TlsObject>>>,
}

impl TlsObjects {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TlsObject>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `obj` as `id`; an id in use is refused (QEMU's text).
    pub fn add(&self, id: &str, obj: TlsObject) -> Result<()> {
        let mut m = self.lock();
        if m.contains_key(id) {
            return Err(Error::InvalidParameter(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        m.insert(id.to_string(), obj);
        Ok(())
    }

    /// Removes `id`; `false` if there was none.
    pub fn remove(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }

    /// The object `id`, if any.
    pub fn get(&self, id: &str) -> Option<TlsObject> {
        self.lock().get(id).cloned()
    }

    /// The TLS of a migration with `params` on `endpoint`'s side: `None` when
    /// `tls-creds` is empty; an error (QEMU's texts) when it names no credentials or
    /// ones for the other endpoint, or `tls-authz` names no `authz-list`.
    pub fn resolve(
        &self,
        params: &MigrationParameters,
        endpoint: TlsEndpoint,
    ) -> Result<Option<TlsConfig>> {
        if params.tls_creds.is_empty() {
            return Ok(None);
        }
        let creds = match self.get(&params.tls_creds) {
            Some(TlsObject::Creds(c)) => c,
            _ => {
                return Err(Error::InvalidParameter(format!(
                    "No TLS credentials with id '{}'",
                    params.tls_creds
                )))
            }
        };
        if creds.endpoint() != endpoint {
            return Err(Error::InvalidParameter(format!(
                "Expecting TLS credentials with a {} endpoint",
                match endpoint {
                    TlsEndpoint::Client => "client",
                    TlsEndpoint::Server => "server",
                }
            )));
        }
        let authz = if params.tls_authz.is_empty() || endpoint == TlsEndpoint::Client {
            None
        } else {
            match self.get(&params.tls_authz) {
                Some(TlsObject::Authz(a)) => Some(a),
                _ => {
                    return Err(Error::InvalidParameter(format!(
                        "Cannot find authorization object '{}'",
                        params.tls_authz
                    )))
                }
            }
        };
        Ok(Some(TlsConfig {
            creds,
            hostname: (!params.tls_hostname.is_empty()).then(|| params.tls_hostname.clone()),
            authz,
        }))
    }
}
