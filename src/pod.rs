//! The parts of a Pod the rules read (docs/design.md), read straight out of the
//! JSON the API server sent. Everything else in the Pod is checked to be
//! JSON and skipped; the strings kept are borrowed from the request body.

use std::borrow::Cow;

use crate::json::{self, Kind, Reader};

/// A Pod as the rules see it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodView<'a> {
    /// `None` when the Pod has no `metadata` object (possible in `render`'s
    /// templates; the API server always sends one).
    pub metadata: Option<Meta<'a>>,
    /// `spec.containers`, `None` when absent.
    pub containers: Option<Vec<Container<'a>>>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Meta<'a> {
    pub name: Option<Cow<'a, str>>,
    pub generate_name: Option<Cow<'a, str>>,
    pub namespace: Option<Cow<'a, str>>,
    pub labels: Option<Pairs<'a>>,
    pub annotations: Option<Pairs<'a>>,
}

/// A string map in the order it was written. A key written twice counts
/// with its last value, as when the API server (Go) decodes it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pairs<'a>(pub Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl Pairs<'_> {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_ref())
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Container<'a> {
    pub name: Cow<'a, str>,
    pub env: Option<Vec<EnvVar<'a>>>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EnvVar<'a> {
    pub name: Cow<'a, str>,
    pub value: Option<Cow<'a, str>>,
    /// Whether the entry has a (non-null) `valueFrom`.
    pub value_from: bool,
}

impl<'a> PodView<'a> {
    /// Reads a whole JSON text that is one Pod.
    pub fn parse(text: &'a str) -> json::Result<Self> {
        let mut r = Reader::new(text);
        let pod = PodView::read(&mut r)?;
        r.finish()?;
        Ok(pod)
    }

    /// Reads the Pod object at the cursor. A field of the wrong type is a
    /// [`json::ErrorKind::Shape`] error naming the field; `null` counts as
    /// absent, as Go's decoder treats it.
    pub fn read(r: &mut Reader<'a>) -> json::Result<Self> {
        if r.peek()? != Kind::Object {
            return r.wrong_type("the Pod", "an object");
        }
        let mut pod = PodView::default();
        r.object(|r, key| match &*key {
            "metadata" => {
                pod.metadata = read_meta(r)?;
                Ok(())
            }
            "spec" => {
                let mut containers = None;
                r.opt_object("spec", |r, key| match &*key {
                    "containers" => {
                        containers = read_containers(r)?;
                        Ok(())
                    }
                    _ => r.skip(),
                })?;
                pod.containers = containers;
                Ok(())
            }
            _ => r.skip(),
        })?;
        Ok(pod)
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.metadata.as_ref()?.labels.as_ref()?.get(key)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations()?.get(key)
    }

    pub fn annotations(&self) -> Option<&Pairs<'a>> {
        self.metadata.as_ref()?.annotations.as_ref()
    }

    /// The Pod's name, or its `generateName` (Pods from controllers have no
    /// name at admission time), for logs.
    pub fn display_name(&self) -> &str {
        let Some(m) = &self.metadata else { return "" };
        m.name
            .as_deref()
            .filter(|n| !n.is_empty())
            .or(m.generate_name.as_deref())
            .unwrap_or("")
    }

    pub fn containers(&self) -> &[Container<'a>] {
        self.containers.as_deref().unwrap_or(&[])
    }
}

fn read_meta<'a>(r: &mut Reader<'a>) -> json::Result<Option<Meta<'a>>> {
    let mut m = Meta::default();
    let found = r.opt_object("metadata", |r, key| {
        match &*key {
            "name" => m.name = r.opt_str("metadata.name")?,
            "generateName" => m.generate_name = r.opt_str("metadata.generateName")?,
            "namespace" => m.namespace = r.opt_str("metadata.namespace")?,
            "labels" => m.labels = read_pairs(r, "metadata.labels")?,
            "annotations" => m.annotations = read_pairs(r, "metadata.annotations")?,
            _ => r.skip()?,
        }
        Ok(())
    })?;
    Ok(found.then_some(m))
}

fn read_pairs<'a>(r: &mut Reader<'a>, field: &str) -> json::Result<Option<Pairs<'a>>> {
    let mut pairs = Vec::new();
    let found = r.opt_object(field, |r, key| {
        if r.peek()? != Kind::String {
            return r.wrong_type(&format!("{field}[{key:?}]"), "a string");
        }
        pairs.push((key, r.str()?));
        Ok(())
    })?;
    Ok(found.then_some(Pairs(pairs)))
}

fn read_containers<'a>(r: &mut Reader<'a>) -> json::Result<Option<Vec<Container<'a>>>> {
    read_objects(r, "spec.containers", |r, c: &mut Container<'a>, key| {
        match &*key {
            "name" => c.name = r.opt_str("spec.containers[].name")?.unwrap_or_default(),
            "env" => c.env = read_env(r)?,
            _ => r.skip()?,
        }
        Ok(())
    })
}

fn read_env<'a>(r: &mut Reader<'a>) -> json::Result<Option<Vec<EnvVar<'a>>>> {
    read_objects(r, "spec.containers[].env", |r, e: &mut EnvVar<'a>, key| {
        match &*key {
            "name" => {
                e.name = r
                    .opt_str("spec.containers[].env[].name")?
                    .unwrap_or_default()
            }
            "value" => e.value = r.opt_str("spec.containers[].env[].value")?,
            "valueFrom" => {
                e.value_from = !r.null()?;
                if e.value_from {
                    r.skip()?;
                }
            }
            _ => r.skip()?,
        }
        Ok(())
    })
}

/// An array of objects at `field` (or null), each read into a
/// `T::default()` by `fields`, called once per key.
fn read_objects<'a, T: Default>(
    r: &mut Reader<'a>,
    field: &str,
    mut fields: impl FnMut(&mut Reader<'a>, &mut T, Cow<'a, str>) -> json::Result<()>,
) -> json::Result<Option<Vec<T>>> {
    let mut items = Vec::new();
    let found = r.opt_array(field, |r| {
        if r.peek()? != Kind::Object {
            return r.wrong_type(&format!("{field}[]"), "an object");
        }
        let mut item = T::default();
        r.object(|r, key| fields(r, &mut item, key))?;
        items.push(item);
        Ok(())
    })?;
    Ok(found.then_some(items))
}

#[cfg(test)]
mod tests;
