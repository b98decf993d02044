// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The public interface of a crate, read from its sources.
//!
//! [`crate_api`] parses a crate's files with `syn` and describes each
//! public item and each public member of one as an entry: a key naming it
//! by its public path, and a value holding what its users depend on.
//!
//! | key                                       | value                          |
//! | ----------------------------------------- | ------------------------------ |
//! | `protocol::Request`                       | kind, generics, kept attributes |
//! | `protocol::Request.length`                | visibility and type of a field |
//! | `protocol::Request: derive std::clone::Clone` | (present)                  |
//! | `protocol::Request::read_from`            | signature of a method          |
//! | `protocol::ConnectionRole: impl std::convert::TryFrom<u16>` | its members |
//! | `MigratableError::Pause`                  | fields, discriminant, attributes |
//! | `Pausable::quiesce`                       | signature and default body     |
//! | `protocol::ProtocolFeatures::DEVICE_STATE` | the flag's value              |
//!
//! Only formatting is normalized, never a type: values are printed from
//! tokens; a path is resolved through its file's `use` declarations, its
//! module's items and the prelude to the full path it names (so `Result`
//! and `result::Result` after `use std::result` both print as
//! `std::result::Result`, and `Self` as the type it stands for); bounds
//! print alike whether written inline or in a `where` clause; an enum's
//! discriminants print as numbers whether implicit or written; parameter
//! names do not count. Attributes count where they change behaviour
//! (`repr`, `serde`, thiserror's `error`/`source`/`from`, `default`,
//! `non_exhaustive`, `must_use`, `deprecated`); documentation does not.
//! Items under `#[cfg(test)]` are skipped.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use proc_macro2::{Ident, Span};
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::visit_mut::{self, VisitMut};
use syn::{
    braced, Attribute, Expr, Fields, FnArg, GenericParam, Generics, ImplItem, Item, Lit, Meta,
    Path, PathSegment, ReceiverKind, ReturnType, Safety, Signature, StaticMutability, Token,
    TraitItem, Type, TypeParamBound, UseTree, Visibility, WherePredicate,
};

/// Entries by key, sorted.
pub type Api = BTreeMap<String, String>;

/// Every module's scope by the module's path.
type Index<'a> = HashMap<Vec<String>, &'a Scope>;

/// `path` (from `crate`) with re-exports followed to where the item is
/// defined: `crate::Stats` after `pub use ctx::Stats` in the root is
/// `crate::ctx::Stats`.
fn canonical(index: &Index, mut path: Vec<String>) -> Vec<String> {
    // Bounded: a cycle of re-exports cannot compile anyway.
    'restart: for _ in 0..32 {
        if path.first().is_none_or(|s| s != "crate") {
            return path;
        }
        for i in 1..path.len() {
            let Some(scope) = index.get(&path[..i]) else {
                return path;
            };
            let sub = path[..=i].to_vec();
            if index.contains_key(&sub) {
                continue;
            }
            match scope.uses.get(&path[i]) {
                Some(target) if target != &sub => {
                    path = [&target[..], &path[i + 1..]].concat();
                    continue 'restart;
                }
                _ => return path,
            }
        }
        return path;
    }
    path
}

/// Attributes whose presence or arguments change what users get.
const KEPT_ATTRIBUTES: &[&str] = &[
    "repr",
    "serde",
    "error",
    "source",
    "from",
    "backtrace",
    "default",
    "non_exhaustive",
    "must_use",
    "deprecated",
];

/// `use` targets of these crates whose last segment is lower case are
/// macros: importing them does not bring a module into scope.
const MACRO_CRATES: &[&str] = &["anyhow", "bitflags", "log"];

/// Names the Rust prelude brings into scope, with the paths they name.
const PRELUDE: &[(&str, &str)] = &[
    ("AsMut", "std::convert::AsMut"),
    ("AsRef", "std::convert::AsRef"),
    ("Box", "std::boxed::Box"),
    ("Clone", "std::clone::Clone"),
    ("Copy", "std::marker::Copy"),
    ("Debug", "std::fmt::Debug"),
    ("Default", "std::default::Default"),
    ("Drop", "std::ops::Drop"),
    ("Eq", "std::cmp::Eq"),
    ("Err", "std::result::Result::Err"),
    ("Fn", "std::ops::Fn"),
    ("FnMut", "std::ops::FnMut"),
    ("FnOnce", "std::ops::FnOnce"),
    ("From", "std::convert::From"),
    ("Hash", "std::hash::Hash"),
    ("Into", "std::convert::Into"),
    ("IntoIterator", "std::iter::IntoIterator"),
    ("Iterator", "std::iter::Iterator"),
    ("None", "std::option::Option::None"),
    ("Ok", "std::result::Result::Ok"),
    ("Option", "std::option::Option"),
    ("Ord", "std::cmp::Ord"),
    ("PartialEq", "std::cmp::PartialEq"),
    ("PartialOrd", "std::cmp::PartialOrd"),
    ("Result", "std::result::Result"),
    ("Send", "std::marker::Send"),
    ("Sized", "std::marker::Sized"),
    ("Some", "std::option::Option::Some"),
    ("String", "std::string::String"),
    ("Sync", "std::marker::Sync"),
    ("ToOwned", "std::borrow::ToOwned"),
    ("ToString", "std::string::ToString"),
    ("TryFrom", "std::convert::TryFrom"),
    ("TryInto", "std::convert::TryInto"),
    ("Unpin", "std::marker::Unpin"),
    ("Vec", "std::vec::Vec"),
];

/// The public interface of the crate whose root is `lib.rs`; `load`
/// returns a source file's text by its path relative to the crate's
/// source directory (`lib.rs`, `protocol.rs`, `a/mod.rs`).
pub fn crate_api(load: &dyn Fn(&str) -> Option<String>) -> Result<Api, String> {
    let mut krate = Crate::default();
    krate.load_file(load, "lib.rs", "", vec!["crate".into()], true)?;
    krate.describe()
}

/// One module: its path from `crate`, whether it is reachable from
/// outside, its items and how names resolve in it.
struct Module {
    path: Vec<String>,
    public: bool,
    items: Vec<Item>,
    scope: Scope,
}

#[derive(Default)]
struct Scope {
    /// The module's own path, `crate` first.
    module: Vec<String>,
    /// Names brought in by `use`, with the full paths they name.
    uses: HashMap<String, Vec<String>>,
    /// Names of the module's own items.
    locals: HashSet<String>,
}

impl Scope {
    /// `segments` as a path from `crate` (or from an external crate).
    fn absolute(&self, segments: &[String]) -> Vec<String> {
        let Some(first) = segments.first() else {
            return Vec::new();
        };
        match first.as_str() {
            "crate" => segments.to_vec(),
            "self" => [&self.module[..], &segments[1..]].concat(),
            "super" => {
                let mut base = self.module.clone();
                let mut rest = segments;
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop();
                    rest = &rest[1..];
                }
                [&base[..], rest].concat()
            }
            name if self.locals.contains(name) => [&self.module[..], segments].concat(),
            _ => segments.to_vec(),
        }
    }
}

#[derive(Default)]
struct Crate {
    modules: Vec<Module>,
}

fn is_pub(vis: &Visibility) -> bool {
    matches!(vis, Visibility::Public(_))
}

fn item_attrs(item: &Item) -> &[Attribute] {
    match item {
        Item::Const(i) => &i.attrs,
        Item::Enum(i) => &i.attrs,
        Item::ExternCrate(i) => &i.attrs,
        Item::Fn(i) => &i.attrs,
        Item::ForeignMod(i) => &i.attrs,
        Item::Impl(i) => &i.attrs,
        Item::Macro(i) => &i.attrs,
        Item::Mod(i) => &i.attrs,
        Item::Static(i) => &i.attrs,
        Item::Struct(i) => &i.attrs,
        Item::Trait(i) => &i.attrs,
        Item::TraitAlias(i) => &i.attrs,
        Item::Type(i) => &i.attrs,
        Item::Union(i) => &i.attrs,
        Item::Use(i) => &i.attrs,
        _ => &[],
    }
}

fn is_cfg_test(attrs: &[Attribute]) -> bool {
    attrs.iter().any(|a| match &a.meta {
        Meta::List(list) if list.path.is_ident("cfg") => list
            .tokens
            .to_string()
            .split_whitespace()
            .any(|t| t == "test"),
        _ => false,
    })
}

fn ident(s: &str) -> Ident {
    Ident::new(s, Span::call_site())
}

/// `t` printed from its tokens, paths without the printer's spaces.
fn tokens(t: &impl ToTokens) -> String {
    t.to_token_stream().to_string().replace(" :: ", "::")
}

/// `text` without the spaces the printer puts around angle brackets, for
/// keys (`TryFrom<u16>`).
fn compact(text: &str) -> String {
    text.replace(" < ", "<")
        .replace(" >", ">")
        .replace(" ,", ",")
}

/// The name an item defines in its module, if any (for a `bitflags!`
/// invocation, the names of the structs it declares).
fn item_names(item: &Item) -> Vec<String> {
    let one = |i: &Ident| vec![i.to_string()];
    match item {
        Item::Const(i) => one(&i.ident),
        Item::Enum(i) => one(&i.ident),
        Item::Fn(i) => one(&i.sig.ident),
        Item::Mod(i) => one(&i.ident),
        Item::Static(i) => one(&i.ident),
        Item::Struct(i) => one(&i.ident),
        Item::Trait(i) => one(&i.ident),
        Item::TraitAlias(i) => one(&i.ident),
        Item::Type(i) => one(&i.ident),
        Item::Union(i) => one(&i.ident),
        Item::Macro(m) if is_bitflags(&m.mac) => m
            .mac
            .parse_body_with(parse_bitflags)
            .map(|all| all.iter().map(|b| b.ident.to_string()).collect())
            .unwrap_or_default(),
        Item::Macro(m) => m.ident.iter().map(Ident::to_string).collect(),
        _ => Vec::new(),
    }
}

/// `(name, path)` of each name a `use` tree brings in; globs are refused.
fn use_entries(
    tree: &UseTree,
    prefix: &mut Vec<String>,
    out: &mut Vec<(String, Vec<String>)>,
) -> Result<(), String> {
    match tree {
        UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_entries(&p.tree, prefix, out)?;
            prefix.pop();
        }
        UseTree::Name(n) if n.ident == "self" => {
            if let Some(last) = prefix.last() {
                out.push((last.clone(), prefix.clone()));
            }
        }
        UseTree::Name(n) => {
            let name = n.ident.to_string();
            out.push((name.clone(), [&prefix[..], &[name]].concat()));
        }
        UseTree::Rename(r) => {
            if r.rename != "_" {
                let path = [&prefix[..], &[r.ident.to_string()]].concat();
                out.push((r.rename.to_string(), path));
            }
        }
        UseTree::Glob(_) => {
            return Err(format!(
                "`use {}::*`: glob imports are not resolved",
                prefix.join("::")
            ))
        }
        UseTree::Group(g) => {
            for t in &g.items {
                use_entries(t, prefix, out)?;
            }
        }
    }
    Ok(())
}

/// `bitflags!` or `bitflags::bitflags!`.
fn is_bitflags(mac: &syn::Macro) -> bool {
    mac.path
        .segments
        .last()
        .is_some_and(|s| s.ident == "bitflags")
}

fn is_macro_import(path: &[String]) -> bool {
    path.len() == 2
        && MACRO_CRATES.contains(&path[0].as_str())
        && path[1].starts_with(|c: char| c.is_ascii_lowercase())
}

impl Crate {
    fn load_file(
        &mut self,
        load: &dyn Fn(&str) -> Option<String>,
        file: &str,
        dir: &str,
        path: Vec<String>,
        public: bool,
    ) -> Result<(), String> {
        let text = load(file).ok_or_else(|| format!("{file}: no such source file"))?;
        let parsed = syn::parse_file(&text).map_err(|e| format!("{file}: {e}"))?;
        self.add_module(load, dir, path, public, parsed.items)
            .map_err(|e| format!("{file}: {e}"))
    }

    fn add_module(
        &mut self,
        load: &dyn Fn(&str) -> Option<String>,
        dir: &str,
        path: Vec<String>,
        public: bool,
        items: Vec<Item>,
    ) -> Result<(), String> {
        let items: Vec<Item> = items
            .into_iter()
            .filter(|i| !is_cfg_test(item_attrs(i)))
            .collect();
        for item in &items {
            let Item::Mod(m) = item else { continue };
            let name = m.ident.to_string();
            let sub = [&path[..], std::slice::from_ref(&name)].concat();
            let sub_public = public && is_pub(&m.vis);
            let sub_dir = format!("{dir}{name}/");
            match &m.content {
                Some((_, inner)) => {
                    self.add_module(load, &sub_dir, sub, sub_public, inner.clone())?
                }
                None => {
                    let flat = format!("{dir}{name}.rs");
                    let file = if load(&flat).is_some() {
                        flat
                    } else {
                        format!("{dir}{name}/mod.rs")
                    };
                    self.load_file(load, &file, &sub_dir, sub, sub_public)?;
                }
            }
        }
        let mut scope = Scope {
            module: path.clone(),
            ..Scope::default()
        };
        scope.locals = items.iter().flat_map(item_names).collect();
        for item in &items {
            let Item::Use(u) = item else { continue };
            let mut entries = Vec::new();
            use_entries(&u.tree, &mut Vec::new(), &mut entries)?;
            for (name, target) in entries {
                if !is_macro_import(&target) {
                    let target = scope.absolute(&target);
                    scope.uses.insert(name, target);
                }
            }
        }
        self.modules.push(Module {
            path,
            public,
            items,
            scope,
        });
        Ok(())
    }

    /// Every public entry of the crate.
    fn describe(&self) -> Result<Api, String> {
        let index: Index = self
            .modules
            .iter()
            .map(|m| (m.path.clone(), &m.scope))
            .collect();
        // Where each named item is defined: (module, item).
        let mut defs: HashMap<Vec<String>, (usize, usize)> = HashMap::new();
        let mut modules: HashSet<Vec<String>> = HashSet::new();
        for (m, module) in self.modules.iter().enumerate() {
            modules.insert(module.path.clone());
            for (i, item) in module.items.iter().enumerate() {
                if matches!(item, Item::Mod(_)) {
                    continue;
                }
                for name in item_names(item) {
                    defs.insert([&module.path[..], &[name]].concat(), (m, i));
                }
            }
        }

        // The public paths of each defined item.
        let mut public: HashMap<Vec<String>, Vec<String>> = HashMap::new();
        let mut api = Api::new();
        for module in self.modules.iter().filter(|m| m.public) {
            let prefix = public_prefix(&module.path);
            for item in &module.items {
                match item {
                    Item::Mod(m) if is_pub(&m.vis) => {
                        insert(&mut api, format!("{prefix}{}", m.ident), "mod".into())?;
                    }
                    Item::Use(u) if is_pub(&u.vis) => {
                        let mut entries = Vec::new();
                        use_entries(&u.tree, &mut Vec::new(), &mut entries)?;
                        for (name, target) in entries {
                            let target = canonical(&index, module.scope.absolute(&target));
                            let key = format!("{prefix}{name}");
                            if defs.contains_key(&target) {
                                public.entry(target).or_default().push(key);
                            } else if modules.contains(&target) {
                                return Err(format!(
                                    "{key}: re-exported modules are not described"
                                ));
                            } else {
                                insert(&mut api, key, format!("reexport {}", target.join("::")))?;
                            }
                        }
                    }
                    Item::Macro(m) if m.ident.is_none() && !is_bitflags(&m.mac) => {
                        return Err(format!(
                            "{}: cannot tell what `{}!` defines",
                            module.path.join("::"),
                            tokens(&m.mac.path)
                        ));
                    }
                    _ if item_is_pub(item) => {
                        for name in item_names(item) {
                            let def = [&module.path[..], std::slice::from_ref(&name)].concat();
                            public
                                .entry(def)
                                .or_default()
                                .push(format!("{prefix}{name}"));
                        }
                    }
                    _ => {}
                }
            }
        }

        for (def, paths) in &public {
            let (m, i) = defs[def];
            let module = &self.modules[m];
            for path in paths {
                let r = Resolver::new(&module.scope, &index, Some(def));
                describe_item(&mut api, path, def, &module.items[i], &r)?;
            }
        }

        for module in &self.modules {
            for item in &module.items {
                let Item::Impl(imp) = item else { continue };
                let plain = Resolver::new(&module.scope, &index, None);
                let Some(self_def) = impl_self(&imp.self_ty, &plain) else {
                    continue;
                };
                let Some(paths) = public.get(&self_def) else {
                    continue;
                };
                if let Some((trait_path, _)) = &imp.trait_ {
                    let trait_def = resolve_path(trait_path, &plain);
                    let local_trait = trait_def.first().is_some_and(|s| s == "crate");
                    if local_trait && !public.contains_key(&trait_def) {
                        continue;
                    }
                }
                let r = Resolver::new(&module.scope, &index, Some(&self_def));
                for path in paths {
                    describe_impl(&mut api, path, imp, &r)?;
                }
            }
        }
        Ok(api)
    }
}

fn item_is_pub(item: &Item) -> bool {
    match item {
        Item::Const(i) => is_pub(&i.vis),
        Item::Enum(i) => is_pub(&i.vis),
        Item::Fn(i) => is_pub(&i.vis),
        Item::Static(i) => is_pub(&i.vis),
        Item::Struct(i) => is_pub(&i.vis),
        Item::Trait(i) => is_pub(&i.vis),
        Item::TraitAlias(i) => is_pub(&i.vis),
        Item::Type(i) => is_pub(&i.vis),
        Item::Union(i) => is_pub(&i.vis),
        Item::Macro(m) if is_bitflags(&m.mac) => m
            .mac
            .parse_body_with(parse_bitflags)
            .is_ok_and(|all| all.iter().any(|b| is_pub(&b.vis))),
        Item::Macro(m) => m.attrs.iter().any(|a| a.path().is_ident("macro_export")),
        _ => false,
    }
}

/// `protocol::` for `crate::protocol`, nothing for the crate root.
fn public_prefix(module: &[String]) -> String {
    module[1..].iter().map(|s| format!("{s}::")).collect()
}

fn insert(api: &mut Api, key: String, value: String) -> Result<(), String> {
    match api.insert(key.clone(), value) {
        None => Ok(()),
        Some(_) => Err(format!("{key}: described twice")),
    }
}

/// The path a type names, if it is a plain path (an impl's self type).
fn impl_self(ty: &Type, r: &Resolver) -> Option<Vec<String>> {
    match ty {
        Type::Path(p) if p.qself.is_none() => Some(resolve_path(&p.path, r)),
        _ => None,
    }
}

/// The idents of `path` once resolved, without generic arguments.
fn resolve_path(path: &Path, r: &Resolver) -> Vec<String> {
    let mut path = path.clone();
    r.within(&Generics::default()).visit_path_mut(&mut path);
    path.segments.iter().map(|s| s.ident.to_string()).collect()
}

/// Rewrites paths to the full paths they name.
struct Resolver<'a> {
    scope: &'a Scope,
    index: &'a Index<'a>,
    self_ty: Option<&'a [String]>,
    generics: HashSet<String>,
}

impl<'a> Resolver<'a> {
    fn new(scope: &'a Scope, index: &'a Index<'a>, self_ty: Option<&'a [String]>) -> Self {
        Resolver {
            scope,
            index,
            self_ty,
            generics: HashSet::new(),
        }
    }

    /// The same resolver inside an item with `generics`.
    fn within(&self, generics: &Generics) -> Resolver<'a> {
        let mut generics_in_scope = self.generics.clone();
        for p in &generics.params {
            if let GenericParam::Type(t) = p {
                generics_in_scope.insert(t.ident.to_string());
            }
        }
        Resolver {
            scope: self.scope,
            index: self.index,
            self_ty: self.self_ty,
            generics: generics_in_scope,
        }
    }

    /// The full path that `first`, a path's first segment, stands for.
    fn head(&self, first: &str, alone: bool) -> Option<Vec<String>> {
        self.head_in_scope(first, alone)
            .map(|path| canonical(self.index, path))
    }

    fn head_in_scope(&self, first: &str, alone: bool) -> Option<Vec<String>> {
        if first == "Self" {
            return self.self_ty.map(<[String]>::to_vec);
        }
        if alone && self.generics.contains(first) {
            return None;
        }
        if matches!(first, "crate" | "self" | "super") {
            return Some(self.scope.absolute(&[first.to_string()]));
        }
        if let Some(target) = self.scope.uses.get(first) {
            return Some(target.clone());
        }
        if self.scope.locals.contains(first) {
            return Some(self.scope.absolute(&[first.to_string()]));
        }
        PRELUDE
            .iter()
            .find(|(name, _)| *name == first)
            .map(|(_, path)| path.split("::").map(String::from).collect())
    }

    fn ty(&self, ty: &Type) -> String {
        let mut ty = ty.clone();
        let mut r = self.within(&Generics::default());
        r.visit_type_mut(&mut ty);
        tokens(&ty)
    }

    fn bound(&self, bound: &TypeParamBound) -> String {
        let mut bound = bound.clone();
        let mut r = self.within(&Generics::default());
        r.visit_type_param_bound_mut(&mut bound);
        tokens(&bound)
    }

    fn path(&self, path: &Path) -> String {
        let mut path = path.clone();
        let mut r = self.within(&Generics::default());
        r.visit_path_mut(&mut path);
        tokens(&path)
    }

    fn expr(&self, expr: &Expr) -> String {
        if let Some(value) = eval(expr) {
            return value.to_string();
        }
        let mut expr = expr.clone();
        let mut r = self.within(&Generics::default());
        r.visit_expr_mut(&mut expr);
        tokens(&expr)
    }
}

impl VisitMut for Resolver<'_> {
    fn visit_path_mut(&mut self, path: &mut Path) {
        if path.leading_colon.is_none() && !path.segments.is_empty() {
            let first = path.segments[0].ident.to_string();
            let alone = path.segments.len() == 1;
            if let Some(full) = self.head(&first, alone).filter(|f| !f.is_empty()) {
                let old: Vec<PathSegment> = path.segments.iter().cloned().collect();
                let mut segments = Punctuated::new();
                for s in &full[..full.len() - 1] {
                    segments.push(PathSegment::from(ident(s)));
                }
                let mut head = old[0].clone();
                head.ident = ident(&full[full.len() - 1]);
                segments.push(head);
                for s in &old[1..] {
                    segments.push(s.clone());
                }
                path.segments = segments;
            }
        }
        visit_mut::visit_path_mut(self, path);
    }
}

/// The value of a constant integer expression, if it is one.
fn eval(expr: &Expr) -> Option<i128> {
    match expr {
        Expr::Lit(l) => match &l.lit {
            Lit::Int(i) => i.base10_parse::<i128>().ok(),
            _ => None,
        },
        Expr::Paren(p) => eval(&p.expr),
        Expr::Group(g) => eval(&g.expr),
        Expr::Unary(u) if matches!(u.op, syn::UnOp::Neg(_)) => eval(&u.expr).map(|v| -v),
        Expr::Binary(b) => {
            let (l, r) = (eval(&b.left)?, eval(&b.right)?);
            match b.op {
                syn::BinOp::Shl(_) => u32::try_from(r).ok().and_then(|r| l.checked_shl(r)),
                syn::BinOp::BitOr(_) => Some(l | r),
                syn::BinOp::BitAnd(_) => Some(l & r),
                syn::BinOp::Add(_) => l.checked_add(r),
                syn::BinOp::Sub(_) => l.checked_sub(r),
                syn::BinOp::Mul(_) => l.checked_mul(r),
                _ => None,
            }
        }
        Expr::Path(p) if p.qself.is_none() => match tokens(&p.path).replace(' ', "").as_str() {
            "u8::MAX" => Some(u8::MAX.into()),
            "u16::MAX" => Some(u16::MAX.into()),
            "u32::MAX" => Some(u32::MAX.into()),
            "u64::MAX" => Some(u64::MAX.into()),
            _ => None,
        },
        _ => None,
    }
}

/// The attributes of `attrs` that change behaviour, as written.
fn kept_attrs(attrs: &[Attribute]) -> String {
    attrs
        .iter()
        .filter(|a| {
            a.path()
                .get_ident()
                .is_some_and(|i| KEPT_ATTRIBUTES.contains(&i.to_string().as_str()))
        })
        .map(|a| format!(" {}", tokens(a)))
        .collect()
}

/// The paths an item's `#[derive(...)]` attributes name, resolved.
fn derives(attrs: &[Attribute], r: &Resolver) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for a in attrs.iter().filter(|a| a.path().is_ident("derive")) {
        let paths = a
            .parse_args_with(Punctuated::<Path, Token![,]>::parse_terminated)
            .map_err(|e| format!("derive: {e}"))?;
        out.extend(paths.iter().map(|p| r.path(p)));
    }
    Ok(out)
}

/// `(<params>, where-clause)` of `generics`, bounds gathered per subject
/// (inline or in `where`) and sorted.
fn generics_parts(generics: &Generics, r: &Resolver) -> (String, String) {
    let mut params = Vec::new();
    let mut bounds: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in &generics.params {
        match p {
            GenericParam::Lifetime(l) => {
                let name = tokens(&l.lifetime);
                for b in &l.bounds {
                    bounds.entry(name.clone()).or_default().insert(tokens(b));
                }
                params.push(name);
            }
            GenericParam::Type(t) => {
                let name = t.ident.to_string();
                for b in &t.bounds {
                    bounds.entry(name.clone()).or_default().insert(r.bound(b));
                }
                match &t.default {
                    Some((_, ty)) => params.push(format!("{name} = {}", r.ty(ty))),
                    None => params.push(name),
                }
            }
            GenericParam::Const(c) => params.push(format!("const {}: {}", c.ident, r.ty(&c.ty))),
        }
    }
    for w in generics.where_clause.iter().flat_map(|w| &w.predicates) {
        match w {
            WherePredicate::Lifetime(l) => {
                let set = bounds.entry(tokens(&l.lifetime)).or_default();
                set.extend(l.bounds.iter().map(tokens));
            }
            WherePredicate::Type(t) => {
                let lifetimes = t.lifetimes.as_ref().map(tokens).unwrap_or_default();
                let subject = format!("{lifetimes}{}", r.ty(&t.bounded_ty));
                let set = bounds.entry(subject.trim().to_string()).or_default();
                set.extend(t.bounds.iter().map(|b| r.bound(b)));
            }
            other => {
                bounds.entry(tokens(other)).or_default().insert("?".into());
            }
        }
    }
    let params = if params.is_empty() {
        String::new()
    } else {
        format!("<{}>", params.join(", "))
    };
    let clause: Vec<String> = bounds
        .iter()
        .filter(|(_, b)| !b.is_empty())
        .map(|(subject, b)| {
            format!(
                "{subject}: {}",
                b.iter().cloned().collect::<Vec<_>>().join(" + ")
            )
        })
        .collect();
    let clause = if clause.is_empty() {
        String::new()
    } else {
        format!(" where {}", clause.join(", "))
    };
    (params, clause)
}

/// A function's signature: qualifiers, generics, parameter types (not
/// names), return type and bounds.
fn signature(sig: &Signature, outer: &Resolver) -> String {
    let r = outer.within(&sig.generics);
    let mut s = String::new();
    if sig.constness.is_some() {
        s.push_str("const ");
    }
    if sig.asyncness.is_some() {
        s.push_str("async ");
    }
    match sig.safety {
        Safety::Unsafe(_) => s.push_str("unsafe "),
        Safety::Safe(_) => s.push_str("safe "),
        _ => {}
    }
    if let Some(abi) = &sig.abi {
        s.push_str(&format!("{} ", tokens(abi)));
    }
    let (params, clause) = generics_parts(&sig.generics, &r);
    let inputs: Vec<String> = sig
        .inputs
        .iter()
        .map(|arg| match arg {
            FnArg::Receiver(recv) => match &recv.kind {
                ReceiverKind::Value => "self".to_string(),
                ReceiverKind::Reference(_, lifetime, mutability) => format!(
                    "&{}{}self",
                    lifetime
                        .as_ref()
                        .map(|l| format!("{} ", tokens(l)))
                        .unwrap_or_default(),
                    if mutability.is_some() { "mut " } else { "" }
                ),
                ReceiverKind::Typed(_, ty) => format!("self: {}", r.ty(ty)),
                _ => tokens(recv),
            },
            FnArg::Typed(t) => r.ty(&t.ty),
        })
        .collect();
    let variadic = if sig.variadic.is_some() { ", ..." } else { "" };
    let output = match &sig.output {
        ReturnType::Default => "()".to_string(),
        ReturnType::Type(_, ty) => r.ty(ty),
    };
    s.push_str(&format!(
        "fn {}{params}({}{variadic}) -> {output}{clause}",
        sig.ident,
        inputs.join(", ")
    ));
    s
}

fn visibility(vis: &Visibility) -> String {
    match vis {
        Visibility::Public(_) => "pub".into(),
        Visibility::Inherited => "private".into(),
        other => tokens(other),
    }
}

/// A variant's or tuple struct's fields on one line, with their kept
/// attributes.
fn fields_inline(fields: &Fields, r: &Resolver) -> String {
    let field = |f: &syn::Field| {
        let name = f
            .ident
            .as_ref()
            .map(|i| format!("{i}: "))
            .unwrap_or_default();
        let attrs = kept_attrs(&f.attrs);
        let gap = if attrs.is_empty() { "" } else { " " };
        format!("{}{gap}{name}{}", attrs.trim_start(), r.ty(&f.ty))
    };
    match fields {
        Fields::Named(n) => format!(
            " {{ {} }}",
            n.named.iter().map(field).collect::<Vec<_>>().join(", ")
        ),
        Fields::Unnamed(u) => format!(
            "({})",
            u.unnamed.iter().map(field).collect::<Vec<_>>().join(", ")
        ),
        Fields::Unit => String::new(),
    }
}

fn describe_item(
    api: &mut Api,
    key: &str,
    def: &[String],
    item: &Item,
    base: &Resolver,
) -> Result<(), String> {
    match item {
        Item::Struct(s) => {
            let r = base.within(&s.generics);
            let (params, clause) = generics_parts(&s.generics, &r);
            let shape = match &s.fields {
                Fields::Named(_) => "{..}",
                Fields::Unnamed(_) => "(..)",
                Fields::Unit => ";",
            };
            insert(
                api,
                key.into(),
                format!("struct{params}{clause} {shape}{}", kept_attrs(&s.attrs)),
            )?;
            for d in derives(&s.attrs, &r)? {
                insert(api, format!("{key}: derive {d}"), String::new())?;
            }
            for (n, f) in s.fields.iter().enumerate() {
                let name = f.ident.as_ref().map_or(n.to_string(), Ident::to_string);
                insert(
                    api,
                    format!("{key}.{name}"),
                    format!(
                        "{} {}{}",
                        visibility(&f.vis),
                        r.ty(&f.ty),
                        kept_attrs(&f.attrs)
                    ),
                )?;
            }
        }
        Item::Union(u) => {
            let r = base.within(&u.generics);
            let (params, clause) = generics_parts(&u.generics, &r);
            insert(
                api,
                key.into(),
                format!("union{params}{clause}{}", kept_attrs(&u.attrs)),
            )?;
            for d in derives(&u.attrs, &r)? {
                insert(api, format!("{key}: derive {d}"), String::new())?;
            }
            for f in &u.fields.named {
                let name = f.ident.as_ref().map(Ident::to_string).unwrap_or_default();
                insert(
                    api,
                    format!("{key}.{name}"),
                    format!(
                        "{} {}{}",
                        visibility(&f.vis),
                        r.ty(&f.ty),
                        kept_attrs(&f.attrs)
                    ),
                )?;
            }
        }
        Item::Enum(e) => {
            let r = base.within(&e.generics);
            let (params, clause) = generics_parts(&e.generics, &r);
            insert(
                api,
                key.into(),
                format!("enum{params}{clause}{}", kept_attrs(&e.attrs)),
            )?;
            for d in derives(&e.attrs, &r)? {
                insert(api, format!("{key}: derive {d}"), String::new())?;
            }
            let fieldless = e.variants.iter().all(|v| matches!(v.fields, Fields::Unit));
            let mut next: Option<i128> = Some(0);
            for v in &e.variants {
                let discriminant = match &v.discriminant {
                    Some((_, expr)) => {
                        next = eval(expr).and_then(|n| n.checked_add(1));
                        format!(" = {}", r.expr(expr))
                    }
                    None if fieldless => {
                        let shown = next.map_or("?".to_string(), |n| n.to_string());
                        next = next.and_then(|n| n.checked_add(1));
                        format!(" = {shown}")
                    }
                    None => String::new(),
                };
                insert(
                    api,
                    format!("{key}::{}", v.ident),
                    format!(
                        "variant{}{discriminant}{}",
                        fields_inline(&v.fields, &r),
                        kept_attrs(&v.attrs)
                    ),
                )?;
            }
        }
        Item::Trait(t) => {
            let r = base.within(&t.generics);
            let (params, clause) = generics_parts(&t.generics, &r);
            let supertraits: BTreeSet<String> = t.supertraits.iter().map(|b| r.bound(b)).collect();
            let supertraits: Vec<String> = supertraits.into_iter().collect();
            insert(
                api,
                key.into(),
                format!(
                    "{}{}trait{params}: {}{clause}{}",
                    if t.unsafety.is_some() { "unsafe " } else { "" },
                    if t.modifiers.auto_token.is_some() {
                        "auto "
                    } else {
                        ""
                    },
                    supertraits.join(" + "),
                    kept_attrs(&t.attrs)
                ),
            )?;
            for member in &t.items {
                match member {
                    TraitItem::Fn(f) => {
                        let body = match &f.default {
                            Some(block) => {
                                let mut block = block.clone();
                                r.within(&f.sig.generics).visit_block_mut(&mut block);
                                format!("default {}", tokens(&block))
                            }
                            None => "required".into(),
                        };
                        insert(
                            api,
                            format!("{key}::{}", f.sig.ident),
                            format!("{}; {body}{}", signature(&f.sig, &r), kept_attrs(&f.attrs)),
                        )?;
                    }
                    TraitItem::Type(ty) => {
                        let (params, clause) = generics_parts(&ty.generics, &r);
                        let bounds: BTreeSet<String> =
                            ty.bounds.iter().map(|b| r.bound(b)).collect();
                        let default = ty
                            .default
                            .as_ref()
                            .map(|(_, d)| format!(" = {}", r.ty(d)))
                            .unwrap_or_default();
                        insert(
                            api,
                            format!("{key}::{}", ty.ident),
                            format!(
                                "type{params}: {}{default}{clause}",
                                bounds.into_iter().collect::<Vec<_>>().join(" + ")
                            ),
                        )?;
                    }
                    TraitItem::Const(c) => {
                        let default = c
                            .default
                            .as_ref()
                            .map(|(_, e)| format!(" = {}", r.expr(e)))
                            .unwrap_or_default();
                        insert(
                            api,
                            format!("{key}::{}", c.ident),
                            format!("const: {}{default}", r.ty(&c.ty)),
                        )?;
                    }
                    other => insert(api, format!("{key}::{}", tokens(other)), String::new())?,
                }
            }
        }
        Item::Fn(f) => insert(
            api,
            key.into(),
            format!("{}{}", signature(&f.sig, base), kept_attrs(&f.attrs)),
        )?,
        Item::Const(c) => insert(
            api,
            key.into(),
            format!("const: {} = {}", base.ty(&c.ty), base.expr(&c.expr)),
        )?,
        Item::Static(s) => insert(
            api,
            key.into(),
            format!(
                "static{}: {} = {}",
                if matches!(s.mutability, StaticMutability::Mut(_)) {
                    " mut"
                } else {
                    ""
                },
                base.ty(&s.ty),
                base.expr(&s.expr)
            ),
        )?,
        Item::Type(t) => {
            let r = base.within(&t.generics);
            let (params, clause) = generics_parts(&t.generics, &r);
            insert(
                api,
                key.into(),
                format!("type{params}{clause} = {}", r.ty(&t.ty)),
            )?;
        }
        Item::TraitAlias(t) => insert(api, key.into(), tokens(t))?,
        Item::Macro(m) if is_bitflags(&m.mac) => {
            let all = m
                .mac
                .parse_body_with(parse_bitflags)
                .map_err(|e| format!("{key}: bitflags!: {e}"))?;
            let name = def.last().map(String::as_str).unwrap_or_default();
            for b in all.iter().filter(|b| b.ident == name) {
                insert(
                    api,
                    key.into(),
                    format!(
                        "bitflags struct: {}{}",
                        base.ty(&b.ty),
                        kept_attrs(&b.attrs)
                    ),
                )?;
                for d in derives(&b.attrs, base)? {
                    insert(api, format!("{key}: derive {d}"), String::new())?;
                }
                for (attrs, flag, value) in &b.flags {
                    insert(
                        api,
                        format!("{key}::{flag}"),
                        format!("flag = {}{}", base.expr(value), kept_attrs(attrs)),
                    )?;
                }
            }
        }
        Item::Macro(m) => insert(api, format!("{key}!"), tokens(&m.mac.tokens))?,
        other => return Err(format!("{key}: cannot describe {}", tokens(other))),
    }
    Ok(())
}

fn describe_impl(
    api: &mut Api,
    key: &str,
    imp: &syn::ItemImpl,
    outer: &Resolver,
) -> Result<(), String> {
    let r = outer.within(&imp.generics);
    let (params, clause) = generics_parts(&imp.generics, &r);
    let prefix = if params.is_empty() && clause.is_empty() {
        String::new()
    } else {
        format!("impl{params} {}{clause}: ", r.ty(&imp.self_ty))
    };
    match &imp.trait_ {
        None => {
            for member in &imp.items {
                match member {
                    ImplItem::Fn(f) if is_pub(&f.vis) => insert(
                        api,
                        format!("{key}::{}", f.sig.ident),
                        format!("{prefix}{}{}", signature(&f.sig, &r), kept_attrs(&f.attrs)),
                    )?,
                    ImplItem::Const(c) if is_pub(&c.vis) => insert(
                        api,
                        format!("{key}::{}", c.ident),
                        format!("{prefix}const: {} = {}", r.ty(&c.ty), r.expr(&c.expr)),
                    )?,
                    _ => {}
                }
            }
        }
        Some((trait_path, _)) => {
            let mut members = BTreeSet::new();
            for member in &imp.items {
                members.insert(match member {
                    ImplItem::Fn(f) => signature(&f.sig, &r),
                    ImplItem::Type(t) => format!("type {} = {}", t.ident, r.ty(&t.ty)),
                    ImplItem::Const(c) => format!("const {}: {}", c.ident, r.ty(&c.ty)),
                    other => tokens(other),
                });
            }
            let members: Vec<String> = members.into_iter().collect();
            insert(
                api,
                format!(
                    "{key}: impl {}{}",
                    if imp.modifiers.polarity.is_some() {
                        "!"
                    } else {
                        ""
                    },
                    compact(&r.path(trait_path))
                ),
                format!(
                    "{}{prefix}{{ {} }}",
                    if imp.unsafety.is_some() {
                        "unsafe "
                    } else {
                        ""
                    },
                    members.join("; ")
                ),
            )?;
        }
    }
    Ok(())
}

/// One struct a `bitflags!` invocation declares.
struct Bitflags {
    attrs: Vec<Attribute>,
    vis: Visibility,
    ident: Ident,
    ty: Type,
    flags: Vec<(Vec<Attribute>, Ident, Expr)>,
}

/// The structs a `bitflags!` invocation declares: `#[attrs] pub struct
/// Name: Type { #[attrs] const FLAG = value; ... }`, any number of times.
fn parse_bitflags(input: ParseStream) -> syn::Result<Vec<Bitflags>> {
    let mut all = Vec::new();
    while !input.is_empty() {
        all.push(Bitflags::parse(input)?);
    }
    Ok(all)
}

impl Parse for Bitflags {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let attrs = input.call(Attribute::parse_outer)?;
        let vis: Visibility = input.parse()?;
        input.parse::<Token![struct]>()?;
        let ident: Ident = input.parse()?;
        input.parse::<Token![:]>()?;
        let ty: Type = input.parse()?;
        let body;
        braced!(body in input);
        let mut flags = Vec::new();
        while !body.is_empty() {
            let flag_attrs = body.call(Attribute::parse_outer)?;
            body.parse::<Token![const]>()?;
            let name = body.call(Ident::parse_any)?;
            body.parse::<Token![=]>()?;
            let value: Expr = body.parse()?;
            body.parse::<Token![;]>()?;
            flags.push((flag_attrs, name, value));
        }
        Ok(Bitflags {
            attrs,
            vis,
            ident,
            ty,
            flags,
        })
    }
}
