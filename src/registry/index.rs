//! Hash-table entries that are the objects themselves: a table of `Arc`s looked up by a field
//! of the object (`Borrow`), so a slot costs one pointer instead of a copy of the key beside
//! it. With millions of deployments and keys, that is most of the tables' memory.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use super::model::{ApiKey, Deployment};
use crate::auth::KeyHash;
use crate::host::Slug;

/// Defines a newtype over `Arc<$object>` that hashes, compares and borrows as `$field`.
macro_rules! keyed_by {
    ($(#[$doc:meta])* $name:ident, $object:ty, $key:ty, |$o:ident| $field:expr) => {
        $(#[$doc])*
        pub struct $name(pub Arc<$object>);

        impl $name {
            fn key(&self) -> &$key {
                let $o = &*self.0;
                $field
            }
        }

        impl Borrow<$key> for $name {
            fn borrow(&self) -> &$key {
                self.key()
            }
        }

        impl Hash for $name {
            fn hash<H: Hasher>(&self, state: &mut H) {
                self.key().hash(state)
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.key() == other.key()
            }
        }

        impl Eq for $name {}
    };
}

keyed_by!(
    /// A deployment in the request path's table, found by slug.
    BySlug, Deployment, Slug, |d| &d.slug
);
keyed_by!(
    /// A key in the request path's table, found by its hash.
    ByHash, ApiKey, KeyHash, |k| &k.hash
);
keyed_by!(
    /// A deployment in the writer's table, found by id.
    DeploymentById, Deployment, str, |d| &d.id
);
keyed_by!(
    /// A key in the writer's table, found by id.
    KeyById, ApiKey, str, |k| &k.id
);
