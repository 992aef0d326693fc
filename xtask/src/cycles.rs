//! `cargo xtask cycles`: no import cycle between the modules of a crate.
//!
//! Every crate's `src/lib.rs` and `src/main.rs` are read as token streams
//! (comments, strings and doc text drop out), following `mod` items to
//! their files. A module refers to another when a `use` tree or a path in
//! its code or in a macro's body names it: paths that start with `crate`,
//! `super`, `self` or the name of one of the module's children; paths into
//! other crates are not looked at.
//!
//! The rule, checked at every module of the tree: take the module's own
//! items as one node and each of its children, with everything under it,
//! as one node each; no node may reach back to itself. At the crate root
//! that means no loop among the top-level modules (`config` using
//! `forward::sockmap` is the edge `config -> forward`). Below it, it also
//! means that a child does not use its parent's items while the parent
//! uses that child: what a parent and its children share lives in a child
//! of its own, below them (`forward/contract.rs`, `bench/cells.rs`).
//!
//! Test modules count like any other: a `#[cfg(test)]` module that reaches
//! a module above its parent's layer closes a loop too. A loop that is
//! known and not yet undone is listed in [`KNOWN_LOOPS`]; it must still be
//! there, so that the list cannot go stale.
//!
//! It reads text, not resolved names: a `use` of a glob or an import under
//! another name is followed to the module it names, an item re-exported is
//! charged to the module that re-exports it, but a name that a macro
//! builds and a `#[path]` attribute are not seen.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    path::{Path, PathBuf},
    str::FromStr as _,
};

use anyhow::{Context as _, Result, bail};
use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};

use crate::exec::workspace_root;

/// The crates whose modules are checked, relative to the workspace root.
const CRATES: &[&str] = &[
    "mmproxy",
    "mmproxy-common",
    "xtask",
    "bench",
    "mmproxy-ebpf",
];

/// Loops known and not yet undone, by crate and members (sorted).
const KNOWN_LOOPS: &[(&str, &[&str])] = &[];

pub(crate) fn cycles() -> Result<()> {
    let root = workspace_root();
    let mut found = Vec::new();
    for name in CRATES {
        for tree in ModuleTree::read_crate(&root.join(name))? {
            println!(
                "{}: modules {}, references between them {}",
                shown(&tree.root_file).display(),
                tree.modules.len(),
                tree.references.len()
            );
            found.extend(tree.cycles().into_iter().map(|c| (*name, c)));
        }
    }
    for (name, known) in &found {
        if is_known(name, known, KNOWN_LOOPS) {
            println!("known, not yet undone: {name}: {known}");
        }
    }
    let problems = judge(&found, KNOWN_LOOPS);
    if problems.is_empty() {
        println!("no import loop besides the known ones");
        return Ok(());
    }
    for problem in &problems {
        eprintln!("{problem}");
    }
    bail!("{} problem(s) with import loops", problems.len())
}

fn is_known(name: &str, cycle: &Cycle, known: &[(&str, &[&str])]) -> bool {
    known.iter().any(|(crate_name, members)| {
        *crate_name == name && cycle.members.iter().eq(members.iter().copied())
    })
}

/// Every loop `known` does not list, and every listed loop that is no
/// longer found, as messages: none when the workspace keeps the rule.
fn judge(found: &[(&str, Cycle)], known: &[(&str, &[&str])]) -> Vec<String> {
    let mut problems: Vec<String> = found
        .iter()
        .filter(|(name, cycle)| !is_known(name, cycle, known))
        .map(|(name, cycle)| format!("{name}: {cycle}"))
        .collect();
    for (name, members) in known {
        let still_there = found
            .iter()
            .any(|(n, c)| n == name && c.members.iter().eq(members.iter().copied()));
        if !still_there {
            problems.push(format!(
                "{name}: the known loop {} is gone: remove it from KNOWN_LOOPS",
                members.join(", ")
            ));
        }
    }
    problems
}

/// A module's path from its crate root: `["forward", "sockmap"]`.
type ModPath = Vec<String>;

/// One place where a module names another.
#[derive(Debug, Clone)]
struct Reference {
    from: ModPath,
    to: ModPath,
    /// The path as written, e.g. `crate::config::Mode`.
    written: String,
    file: PathBuf,
}

/// The modules of one crate target and what each refers to.
#[derive(Debug)]
struct ModuleTree {
    root_file: PathBuf,
    /// Every module and its children's names.
    modules: BTreeMap<ModPath, BTreeSet<String>>,
    references: Vec<Reference>,
}

/// A path as written, before it is resolved against the module tree.
#[derive(Debug)]
struct Written {
    module: ModPath,
    segments: Vec<String>,
    file: PathBuf,
}

/// Nodes at `parent`'s level (its own items, its children) that reach
/// each other.
#[derive(Debug)]
struct Cycle {
    parent: ModPath,
    members: BTreeSet<String>,
    /// The references that make the edges between members.
    evidence: Vec<Reference>,
}

impl fmt::Display for Cycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let members: Vec<&str> = self.members.iter().map(String::as_str).collect();
        writeln!(
            f,
            "import loop in `{}` (its own items, its children): {}",
            display_path(&self.parent),
            members.join(", ")
        )?;
        for r in &self.evidence {
            writeln!(
                f,
                "  {} -> {}: `{}` in {}",
                display_path(&r.from),
                display_path(&r.to),
                r.written,
                shown(&r.file).display()
            )?;
        }
        Ok(())
    }
}

/// `path` from the workspace root, as a reader of the output would type it.
fn shown(path: &Path) -> &Path {
    path.strip_prefix(workspace_root()).unwrap_or(path)
}

fn display_path(path: &[String]) -> String {
    if path.is_empty() {
        "crate".to_owned()
    } else {
        path.join("::")
    }
}

impl ModuleTree {
    /// One tree per target root (`src/lib.rs`, `src/main.rs`) of the crate
    /// in `dir`.
    fn read_crate(dir: &Path) -> Result<Vec<Self>> {
        let mut trees = Vec::new();
        for root in ["src/lib.rs", "src/main.rs"] {
            let file = dir.join(root);
            if file.exists() {
                trees.push(Self::read(&file)?);
            }
        }
        if trees.is_empty() {
            bail!("{} has neither src/lib.rs nor src/main.rs", dir.display());
        }
        Ok(trees)
    }

    fn read(root_file: &Path) -> Result<Self> {
        let mut modules = BTreeMap::new();
        let mut written = Vec::new();
        let dir = root_file.parent().expect("a file has a directory");
        read_module_file(root_file, dir, &ModPath::new(), &mut modules, &mut written)?;
        let mut tree = Self {
            root_file: root_file.to_owned(),
            modules,
            references: Vec::new(),
        };
        tree.references = written.iter().filter_map(|w| tree.resolve(w)).collect();
        Ok(tree)
    }

    /// The module a written path ends in, or `None` for a path that does
    /// not start in this crate.
    fn resolve(&self, written: &Written) -> Option<Reference> {
        let mut segments = written.segments.iter().peekable();
        let mut at = match segments.peek()?.as_str() {
            "crate" => {
                segments.next();
                ModPath::new()
            }
            "self" | "super" => {
                let mut at = written.module.clone();
                while let Some(s) = segments.next_if(|s| *s == "super" || *s == "self") {
                    if s == "super" {
                        at.pop()?;
                    }
                }
                at
            }
            first if self.modules.get(&written.module)?.contains(first) => written.module.clone(),
            _ => return None,
        };
        while let Some(child) = segments.next_if(|s| self.modules[&at].contains(*s)) {
            at.push(child.clone());
        }
        (at != written.module).then(|| Reference {
            from: written.module.clone(),
            to: at,
            written: written.segments.join("::"),
            file: written.file.clone(),
        })
    }

    /// The cycles among the children of every module.
    fn cycles(&self) -> Vec<Cycle> {
        self.modules
            .iter()
            .flat_map(|(parent, children)| self.cycles_among_children(parent, children))
            .collect()
    }

    /// The loops among `parent` (its own items) and its children (each
    /// standing for everything under it).
    fn cycles_among_children(&self, parent: &ModPath, children: &BTreeSet<String>) -> Vec<Cycle> {
        // The node that `path` counts as at this level, if it is one.
        let node_of = |path: &ModPath| -> Option<String> {
            if path == parent {
                Some(display_path(parent))
            } else if path.len() > parent.len() && path.starts_with(parent) {
                Some(display_path(&path[..=parent.len()]))
            } else {
                None
            }
        };
        let mut edges: BTreeMap<(String, String), Vec<&Reference>> = BTreeMap::new();
        for r in &self.references {
            if let (Some(a), Some(b)) = (node_of(&r.from), node_of(&r.to))
                && a != b
            {
                edges.entry((a, b)).or_default().push(r);
            }
        }
        let graph: BTreeMap<&str, BTreeSet<&str>> =
            edges.keys().fold(BTreeMap::new(), |mut g, (a, b)| {
                g.entry(a.as_str()).or_default().insert(b.as_str());
                g
            });
        let nodes = std::iter::once(display_path(parent)).chain(children.iter().map(|c| {
            let mut child = parent.clone();
            child.push(c.clone());
            display_path(&child)
        }));
        let mut cycles = Vec::new();
        let mut placed = BTreeSet::new();
        for node in nodes {
            if placed.contains(&node) {
                continue;
            }
            let members = strongly_connected(&graph, &node);
            placed.extend(members.iter().cloned());
            if members.len() > 1 {
                let evidence = edges
                    .iter()
                    .filter(|((a, b), _)| members.contains(a) && members.contains(b))
                    .map(|(_, refs)| refs[0].clone())
                    .collect();
                cycles.push(Cycle {
                    parent: parent.clone(),
                    members,
                    evidence,
                });
            }
        }
        cycles
    }
}

/// The nodes that `start` reaches and that reach `start`, itself included.
fn strongly_connected(graph: &BTreeMap<&str, BTreeSet<&str>>, start: &str) -> BTreeSet<String> {
    let forward = reachable(graph, start);
    forward
        .iter()
        .filter(|n| reachable(graph, n).contains(start))
        .map(|n| (*n).to_owned())
        .collect()
}

fn reachable<'a>(
    graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
    start: &'a str,
) -> BTreeSet<&'a str> {
    let mut seen = BTreeSet::from([start]);
    let mut todo = vec![start];
    while let Some(n) = todo.pop() {
        for &next in graph.get(n).into_iter().flatten() {
            if seen.insert(next) {
                todo.push(next);
            }
        }
    }
    seen
}

/// Reads the module in `file`; `dir` is where its `mod x;` children live.
fn read_module_file(
    file: &Path,
    dir: &Path,
    module: &ModPath,
    modules: &mut BTreeMap<ModPath, BTreeSet<String>>,
    written: &mut Vec<Written>,
) -> Result<()> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let tokens = TokenStream::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not Rust tokens: {e}", file.display()))?;
    let mut reader = FileReader {
        file,
        modules,
        written,
    };
    reader.module(tokens, dir, module)
}

/// Walks one file's tokens, module by module.
struct FileReader<'a> {
    file: &'a Path,
    modules: &'a mut BTreeMap<ModPath, BTreeSet<String>>,
    written: &'a mut Vec<Written>,
}

impl FileReader<'_> {
    fn module(&mut self, tokens: TokenStream, dir: &Path, module: &ModPath) -> Result<()> {
        self.modules.entry(module.clone()).or_default();
        self.tokens(&tokens.into_iter().collect::<Vec<_>>(), dir, module)
    }

    fn tokens(&mut self, tokens: &[TokenTree], dir: &Path, module: &ModPath) -> Result<()> {
        let mut i = 0;
        while i < tokens.len() {
            i = match &tokens[i] {
                TokenTree::Ident(id) if id == "mod" => self.mod_item(tokens, i, dir, module)?,
                TokenTree::Ident(id) if id == "use" => {
                    let end = tokens[i..]
                        .iter()
                        .position(|t| is_punct(t, ';'))
                        .map_or(tokens.len(), |n| i + n);
                    for segments in use_paths(&tokens[i + 1..end]) {
                        self.record(module, segments);
                    }
                    end
                }
                TokenTree::Ident(_) if starts_path(tokens, i) => {
                    let (segments, end) = path_at(tokens, i);
                    self.record(module, segments);
                    end
                }
                TokenTree::Group(g) => {
                    let inner: Vec<_> = g.stream().into_iter().collect();
                    self.tokens(&inner, dir, module)?;
                    i + 1
                }
                _ => i + 1,
            };
        }
        Ok(())
    }

    /// `mod name;` or `mod name { .. }` at `tokens[i]`; returns the index
    /// after it.
    fn mod_item(
        &mut self,
        tokens: &[TokenTree],
        i: usize,
        dir: &Path,
        module: &ModPath,
    ) -> Result<usize> {
        let Some(TokenTree::Ident(name)) = tokens.get(i + 1) else {
            return Ok(i + 1);
        };
        let name = name.to_string();
        let mut child = module.clone();
        child.push(name.clone());
        self.modules
            .entry(module.clone())
            .or_default()
            .insert(name.clone());
        match tokens.get(i + 2) {
            Some(TokenTree::Group(body)) if body.delimiter() == Delimiter::Brace => {
                self.module(body.stream(), &dir.join(&name), &child)?;
            }
            Some(t) if is_punct(t, ';') => {
                let (file, child_dir) = child_file(dir, &name)?;
                read_module_file(&file, &child_dir, &child, self.modules, self.written)?;
            }
            _ => {}
        }
        Ok(i + 3)
    }

    fn record(&mut self, module: &ModPath, segments: Vec<String>) {
        self.written.push(Written {
            module: module.clone(),
            segments,
            file: self.file.to_owned(),
        });
    }
}

/// Where `mod name;` in a module whose children live in `dir` is read
/// from, and where its own children live.
fn child_file(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
    let flat = dir.join(format!("{name}.rs"));
    let nested = dir.join(name).join("mod.rs");
    if flat.exists() {
        Ok((flat, dir.join(name)))
    } else if nested.exists() {
        Ok((nested, dir.join(name)))
    } else {
        bail!("`mod {name};` in {}: no file", dir.display())
    }
}

fn is_punct(t: &TokenTree, c: char) -> bool {
    matches!(t, TokenTree::Punct(p) if p.as_char() == c)
}

/// `::` at `tokens[i]`.
fn is_path_sep(tokens: &[TokenTree], i: usize) -> bool {
    matches!(&tokens.get(i), Some(TokenTree::Punct(p)) if p.as_char() == ':' && p.spacing() == Spacing::Joint)
        && tokens.get(i + 1).is_some_and(|t| is_punct(t, ':'))
}

/// An identifier at `tokens[i]` that begins a path of two or more
/// segments: not the tail of a longer path (`a::b`, `<T>::b`), not a
/// method or field (`x.b`).
fn starts_path(tokens: &[TokenTree], i: usize) -> bool {
    let continues =
        (i >= 2 && is_path_sep(tokens, i - 2)) || (i >= 1 && is_punct(&tokens[i - 1], '.'));
    !continues && is_path_sep(tokens, i + 1)
}

/// The identifiers of the path at `tokens[i]` and the index after it;
/// `$crate` (in `macro_rules!`) is `crate`.
fn path_at(tokens: &[TokenTree], mut i: usize) -> (Vec<String>, usize) {
    let mut segments = Vec::new();
    while let Some(TokenTree::Ident(id)) = tokens.get(i) {
        segments.push(id.to_string());
        if !is_path_sep(tokens, i + 1) {
            return (segments, i + 1);
        }
        i += 3;
    }
    (segments, i)
}

/// The paths a `use` tree (the tokens between `use` and `;`) imports:
/// `crate::{a::{self, B}, c::*}` is `crate::a`, `crate::a::B`, `crate::c`.
fn use_paths(tokens: &[TokenTree]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    use_tree(tokens, &[], &mut out);
    out
}

fn use_tree(tokens: &[TokenTree], prefix: &[String], out: &mut Vec<Vec<String>>) {
    // `use ::std::..`: another crate.
    if is_path_sep(tokens, 0) {
        return;
    }
    let mut path = prefix.to_vec();
    let mut i = 0;
    while let Some(t) = tokens.get(i) {
        match t {
            TokenTree::Ident(id) if id == "as" => break,
            TokenTree::Ident(id) if id == "self" && !prefix.is_empty() && i == 0 => {}
            TokenTree::Ident(id) => path.push(id.to_string()),
            TokenTree::Group(g) if g.delimiter() == Delimiter::Brace => {
                let inner: Vec<_> = g.stream().into_iter().collect();
                for item in inner.split(|t| is_punct(t, ',')) {
                    if !item.is_empty() {
                        use_tree(item, &path, out);
                    }
                }
                return;
            }
            _ => {}
        }
        i += if is_path_sep(tokens, i) { 2 } else { 1 };
    }
    if !path.is_empty() {
        out.push(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crate laid out in a temporary directory from `(path, text)` pairs.
    fn tree(files: &[(&str, &str)]) -> ModuleTree {
        let dir = std::env::temp_dir().join(format!(
            "xtask-cycles-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        for (path, text) in files {
            let file = dir.join(path);
            fs::create_dir_all(file.parent().unwrap()).unwrap();
            fs::write(file, text).unwrap();
        }
        let tree = ModuleTree::read(&dir.join("lib.rs")).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        tree
    }

    fn members(cycles: &[Cycle]) -> Vec<(String, Vec<String>)> {
        cycles
            .iter()
            .map(|c| (display_path(&c.parent), c.members.iter().cloned().collect()))
            .collect()
    }

    #[test]
    fn use_trees_expand_to_every_path() {
        let tokens: Vec<_> = TokenStream::from_str("crate::{a::{self, B}, c::*, d as e}")
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(
            use_paths(&tokens),
            [
                vec!["crate", "a"],
                vec!["crate", "a", "B"],
                vec!["crate", "c"],
                vec!["crate", "d"]
            ]
        );
    }

    #[test]
    fn a_cycle_through_a_submodule_is_a_cycle_of_top_level_modules() {
        let t = tree(&[
            ("lib.rs", "mod cli; mod config; mod forward;"),
            ("cli.rs", "use crate::config::Mode;"),
            (
                "config.rs",
                "pub struct Mode; use crate::forward::sockmap::Ebpf;",
            ),
            ("forward/mod.rs", "pub mod sockmap;"),
            ("forward/sockmap.rs", "fn f(c: &crate::cli::Cli) {}"),
        ]);
        assert_eq!(
            members(&t.cycles()),
            [(
                "crate".to_owned(),
                vec!["cli".to_owned(), "config".to_owned(), "forward".to_owned()]
            )]
        );
    }

    #[test]
    fn siblings_below_the_root_are_judged_too() {
        let t = tree(&[
            ("lib.rs", "mod bench;"),
            ("bench/mod.rs", "mod report; mod targets; struct Results;"),
            ("bench/report.rs", "fn w() { super::targets::write() }"),
            (
                "bench/targets.rs",
                "use super::{Results, report::{median}};",
            ),
        ]);
        assert_eq!(
            members(&t.cycles()),
            [(
                "bench".to_owned(),
                vec!["bench::report".to_owned(), "bench::targets".to_owned()]
            )]
        );
    }

    #[test]
    fn a_child_using_its_parent_that_uses_it_is_a_loop() {
        let t = tree(&[
            ("lib.rs", "mod forward; mod error;"),
            (
                "forward/mod.rs",
                "mod splice; use crate::error::Side; fn f() { splice::run() }",
            ),
            (
                "forward/splice.rs",
                "use super::Connection; mod tests { use super::*; }",
            ),
            ("error.rs", "pub enum Side {}"),
        ]);
        assert_eq!(t.references.len(), 4, "{:#?}", t.references);
        assert_eq!(
            members(&t.cycles()),
            [(
                "forward".to_owned(),
                vec!["forward".to_owned(), "forward::splice".to_owned()]
            )]
        );
    }

    #[test]
    fn what_a_parent_and_its_children_share_may_live_in_a_child_below_them() {
        let t = tree(&[
            ("lib.rs", "mod forward;"),
            (
                "forward/mod.rs",
                "mod contract; mod splice; pub use contract::Connection; fn f() { splice::run() }",
            ),
            ("forward/contract.rs", "pub struct Connection;"),
            ("forward/splice.rs", "use super::contract::Connection;"),
        ]);
        assert!(t.cycles().is_empty(), "{:?}", members(&t.cycles()));
    }

    #[test]
    fn a_known_loop_passes_only_while_it_is_there() {
        let looped = tree(&[
            ("lib.rs", "mod a; mod b;"),
            ("a.rs", "use crate::b::X;"),
            ("b.rs", "use crate::a::Y;"),
        ]);
        let found: Vec<_> = looped.cycles().into_iter().map(|c| ("k", c)).collect();
        assert!(judge(&found, &[("k", &["a", "b"])]).is_empty());
        assert_eq!(judge(&found, &[]).len(), 1);
        assert_eq!(judge(&found, &[("other", &["a", "b"])]).len(), 2);
        let gone = judge(&[], &[("k", &["a", "b"])]);
        assert!(gone[0].contains("is gone"), "{gone:?}");
    }

    #[test]
    fn comments_strings_methods_and_other_crates_are_not_references() {
        let t = tree(&[
            ("lib.rs", "mod a; mod b;"),
            (
                "a.rs",
                r#"//! [`crate::b`]
                /// crate::b::X
                fn f() { let s = "crate::b::X"; x.b::<u8>(); ::b::X; std::b::X; }"#,
            ),
            ("b.rs", "fn g() { crate::a::f() }"),
        ]);
        assert!(t.cycles().is_empty(), "{:?}", members(&t.cycles()));
    }

    #[test]
    fn paths_in_macro_bodies_and_relative_child_paths_count() {
        let t = tree(&[
            ("lib.rs", "mod a; mod b;"),
            ("a.rs", "fn f() { assert!(matches!(x, crate::b::X)); }"),
            ("b.rs", "fn g() { super::a::f() }"),
        ]);
        assert_eq!(
            members(&t.cycles()),
            [("crate".to_owned(), vec!["a".to_owned(), "b".to_owned()])]
        );
        let t = tree(&[
            ("lib.rs", "mod a; mod b;"),
            ("a.rs", "struct S { field: crate::b::X }"),
            ("b.rs", "fn g() { super::a::f() }"),
        ]);
        assert_eq!(
            members(&t.cycles()),
            [("crate".to_owned(), vec!["a".to_owned(), "b".to_owned()])]
        );
    }

    /// The workspace's own crates: the check this module exists for.
    #[test]
    fn the_workspace_has_no_import_loop_besides_the_known_ones() {
        let root = workspace_root();
        let mut found = Vec::new();
        for name in CRATES {
            for tree in ModuleTree::read_crate(&root.join(name)).unwrap() {
                assert!(
                    !tree.references.is_empty() || tree.modules.len() == 1,
                    "{}: modules but no references read",
                    tree.root_file.display()
                );
                found.extend(tree.cycles().into_iter().map(|c| (*name, c)));
            }
        }
        let problems = judge(&found, KNOWN_LOOPS);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
