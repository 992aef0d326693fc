//! `cargo xtask cycles`: no import cycle between the modules of a crate.
//!
//! Every crate's `src/lib.rs` and `src/main.rs` are read as token streams
//! (comments, strings and doc text drop out), following `mod` items to
//! their files. A module refers to another when a `use` tree or a path in
//! its code or in a macro's body names it: paths that start with `crate`,
//! `super`, `self` or the name of one of the module's children; paths into
//! other crates are not looked at.
//!
//! The rule, checked at every level of the tree: among the children of one
//! module (the top-level modules are the crate root's children), none
//! reaches back to itself. A child stands for everything under it, so
//! `config` using `forward::sockmap` is the edge `config -> forward`. A
//! module may use its parent's items and the parent its children's (a
//! parent is its children's facade and often holds what they share);
//! those are not edges between siblings and are not judged here.
//!
//! Test modules count like any other: a `#[cfg(test)]` module that reaches
//! a module above its parent's layer closes a cycle too.
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
            found.extend(tree.cycles());
        }
    }
    if found.is_empty() {
        println!("no import cycle");
        return Ok(());
    }
    for cycle in &found {
        eprintln!("{cycle}");
    }
    bail!("{} import cycle(s)", found.len())
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

/// Siblings (children of `parent`) that reach each other.
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
            "import cycle among the children of `{}`: {}",
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

    fn cycles_among_children(&self, parent: &ModPath, children: &BTreeSet<String>) -> Vec<Cycle> {
        // The child of `parent` that `path` lies under, if any.
        let child_of = |path: &ModPath| -> Option<String> {
            (path.len() > parent.len() && path.starts_with(parent))
                .then(|| path[parent.len()].clone())
        };
        let mut edges: BTreeMap<(String, String), Vec<&Reference>> = BTreeMap::new();
        for r in &self.references {
            if let (Some(a), Some(b)) = (child_of(&r.from), child_of(&r.to))
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
        let mut cycles = Vec::new();
        let mut placed = BTreeSet::new();
        for child in children {
            if placed.contains(child.as_str()) {
                continue;
            }
            let members = strongly_connected(&graph, child);
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
                vec!["report".to_owned(), "targets".to_owned()]
            )]
        );
    }

    #[test]
    fn parent_and_child_may_use_each_other() {
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
        assert!(t.cycles().is_empty(), "{:?}", members(&t.cycles()));
        assert_eq!(t.references.len(), 4, "{:#?}", t.references);
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
    fn the_workspace_has_no_import_cycle() {
        let root = workspace_root();
        let mut found = Vec::new();
        for name in CRATES {
            for tree in ModuleTree::read_crate(&root.join(name)).unwrap() {
                assert!(
                    !tree.references.is_empty() || tree.modules.len() == 1,
                    "{}: modules but no references read",
                    tree.root_file.display()
                );
                found.extend(tree.cycles().iter().map(ToString::to_string));
            }
        }
        assert!(found.is_empty(), "{}", found.join("\n"));
    }
}
