// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A minimal checker of JSON against Cloud Hypervisor's OpenAPI 3.0
//! description (`cloud-hypervisor.yaml` of the pinned build): `$ref`,
//! `type`, `required`, `properties`, `additionalProperties`, `items`,
//! `enum`, `minimum`, `maximum`, `minLength`. What it does not know it
//! refuses, so a schema it cannot read fails the test instead of passing.
//!
//! `null` for an optional property counts as absent: CH serializes its
//! `Option` fields as `null` (`tls_dir: null` in what ch-remote sends).

use serde_json::{Map, Value};
use yaml_rust2::{Yaml, YamlLoader};

fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Real(s) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Null, Value::Number),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => {
            let mut m = Map::new();
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    other => format!("{other:?}"),
                };
                m.insert(key, to_json(v));
            }
            Value::Object(m)
        }
        _ => Value::Null,
    }
}

pub struct OpenApi {
    doc: Value,
}

impl OpenApi {
    pub fn load(path: &std::path::Path) -> OpenApi {
        let text = std::fs::read_to_string(path).expect("read cloud-hypervisor.yaml");
        let docs = YamlLoader::load_from_str(&text).expect("parse cloud-hypervisor.yaml");
        OpenApi {
            doc: to_json(&docs[0]),
        }
    }

    /// The schema of `path`'s `method` request body.
    pub fn request_schema(&self, path: &str, method: &str) -> Value {
        let s = &self.doc["paths"][path][method]["requestBody"]["content"]["application/json"]
            ["schema"];
        assert!(s.is_object(), "{method} {path}: no request schema");
        s.clone()
    }

    /// The schema of `path`'s `method` answer with `status`.
    pub fn response_schema(&self, path: &str, method: &str, status: u16) -> Value {
        let s = &self.doc["paths"][path][method]["responses"][status.to_string()]["content"]
            ["application/json"]["schema"];
        assert!(
            s.is_object(),
            "{method} {path} {status}: no response schema"
        );
        s.clone()
    }

    /// Whether `path`'s `method` documents `status`.
    pub fn documents(&self, path: &str, method: &str, status: u16) -> bool {
        self.doc["paths"][path][method]["responses"]
            .get(status.to_string())
            .is_some()
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r
                    .strip_prefix("#/components/schemas/")
                    .unwrap_or_else(|| panic!("unsupported $ref {r}"));
                let s = &self.doc["components"]["schemas"][name];
                assert!(s.is_object(), "no schema {name}");
                self.resolve(s)
            }
            None => schema,
        }
    }

    /// Every way `value` breaks `schema`, as `path: problem` lines.
    pub fn check(&self, schema: &Value, value: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        self.walk(schema, value, "$", &mut errors);
        errors
    }

    fn walk(&self, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
        let schema = self.resolve(schema);
        const KNOWN: [&str; 15] = [
            "type",
            "required",
            "properties",
            "additionalProperties",
            "items",
            "enum",
            "minimum",
            "maximum",
            "minLength",
            "format",
            "default",
            "description",
            "$ref",
            "nullable",
            "example",
        ];
        if let Some(obj) = schema.as_object() {
            for k in obj.keys() {
                assert!(
                    KNOWN.contains(&k.as_str()),
                    "{at}: schema keyword {k} unknown to the checker"
                );
            }
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            if !allowed.contains(value) {
                errors.push(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        let ty = schema.get("type").and_then(Value::as_str);
        match ty {
            Some("object") | None if value.is_object() => {
                let obj = value.as_object().unwrap_or(&Map::new()).clone();
                for r in schema["required"].as_array().into_iter().flatten() {
                    let name = r.as_str().unwrap_or_default();
                    if obj.get(name).is_none_or(Value::is_null) {
                        errors.push(format!("{at}: required {name} missing"));
                    }
                }
                let props = schema["properties"].as_object();
                for (k, v) in &obj {
                    let here = format!("{at}.{k}");
                    match props.and_then(|p| p.get(k)) {
                        Some(_) if v.is_null() => {}
                        Some(s) => self.walk(s, v, &here, errors),
                        None => match schema.get("additionalProperties") {
                            Some(Value::Bool(false)) => errors.push(format!("{here}: not allowed")),
                            Some(s @ Value::Object(_)) => self.walk(s, v, &here, errors),
                            _ => {}
                        },
                    }
                }
            }
            Some("object") => errors.push(format!("{at}: {value} is not an object")),
            Some("array") => match value.as_array() {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        self.walk(&schema["items"], item, &format!("{at}[{i}]"), errors);
                    }
                }
                None => errors.push(format!("{at}: {value} is not an array")),
            },
            Some("string") => match value.as_str() {
                Some(s) => {
                    if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
                        if (s.len() as u64) < min {
                            errors.push(format!("{at}: shorter than {min}"));
                        }
                    }
                }
                None => errors.push(format!("{at}: {value} is not a string")),
            },
            Some("integer") | Some("number") => {
                let n = if ty == Some("integer") {
                    value
                        .as_i64()
                        .map(|n| n as f64)
                        .or(value.as_u64().map(|n| n as f64))
                } else {
                    value.as_f64()
                };
                match n {
                    Some(n) => {
                        if schema
                            .get("minimum")
                            .and_then(Value::as_f64)
                            .is_some_and(|m| n < m)
                        {
                            errors.push(format!("{at}: {n} below the minimum"));
                        }
                        if schema
                            .get("maximum")
                            .and_then(Value::as_f64)
                            .is_some_and(|m| n > m)
                        {
                            errors.push(format!("{at}: {n} above the maximum"));
                        }
                    }
                    None => errors.push(format!(
                        "{at}: {value} is not an {}",
                        ty.unwrap_or("integer")
                    )),
                }
            }
            Some("boolean") if !value.is_boolean() => {
                errors.push(format!("{at}: {value} is not a boolean"));
            }
            Some("boolean") => {}
            None => {}
            Some(other) => panic!("{at}: schema type {other} unknown to the checker"),
        }
    }
}
