//! Where a statement may run: PostgreSQL's own grammar (libpg_query, through
//! `pg_query`) reads it, and only shapes known to touch one group are
//! routed; everything else goes to the coordinator. Never a guess: an
//! unknown table, a subquery, a join, a CTE, an OR around the key, a key of
//! a type pgferry cannot hash exactly all mean the coordinator.

use super::hash::{self, DistType};
use super::metadata::{Snapshot, Table, TableKind};
use pg_query::protobuf::{a_const::Val, node::Node as N, Node};
use std::sync::Arc;

/// Where a statement (or a transaction's first statement) goes.
#[derive(Debug, Clone)]
pub enum Plan {
    /// The coordinator, and why (for logs and SHOW CITUS).
    Coordinator(&'static str),
    /// One group, known from the text alone (a literal key, a single-shard
    /// table).
    Group(u32),
    /// Reads of reference tables only: any primary has them.
    AnyPrimary,
    /// The key is a bound parameter (or several, one per INSERT row):
    /// decided at Bind.
    Params(Arc<ParamPlan>),
    /// Transaction control, SET, and the like: no table; the statement
    /// after it decides.
    Neutral,
    /// A read of several shards that any metadata-synced primary can run
    /// (Citus "query from any node"): balanced when `any_node` is on, else
    /// the coordinator.
    AnyNodeRead,
}

/// Functions a statement may call and still be balanced across nodes:
/// aggregates and plain functions whose result does not depend on the node
/// (`nextval` and the like do: each node has its own sequence range).
const ANY_NODE_FUNCTIONS: &[&str] = &[
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "bool_and",
    "bool_or",
    "string_agg",
    "array_agg",
    "lower",
    "upper",
    "length",
    "abs",
    "round",
    "floor",
    "ceil",
    "date_trunc",
    "coalesce",
    "greatest",
    "least",
];

/// Whether every function call in the tree is in [`ANY_NODE_FUNCTIONS`].
fn functions_node_independent(tree: &str) -> bool {
    if !tree.contains("{\"FuncCall\":") {
        return true;
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(tree) else {
        return false;
    };
    fn walk(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(f) = m.get("FuncCall") {
                    let names: Vec<&str> = f
                        .get("funcname")
                        .and_then(|n| n.as_array())
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.pointer("/node/String/sval").or_else(|| x.pointer("/String/sval")))
                                .filter_map(|s| s.as_str())
                                .collect()
                        })
                        .unwrap_or_default();
                    let ok = match names.as_slice() {
                        [name] | ["pg_catalog", name] => ANY_NODE_FUNCTIONS.contains(name),
                        _ => false,
                    };
                    if !ok {
                        return false;
                    }
                }
                m.values().all(walk)
            }
            serde_json::Value::Array(a) => a.iter().all(walk),
            _ => true,
        }
    }
    walk(&v)
}

#[derive(Debug)]
pub struct ParamPlan {
    pub table: Arc<Table>,
    pub dist_type: DistType,
    /// 0-based parameter numbers whose values must all hash to one group.
    pub params: Vec<usize>,
    /// Literal keys of the same statement (an INSERT mixing both).
    pub literal_groups: Vec<u32>,
}

impl ParamPlan {
    /// The group for these Bind parameter values; None: the coordinator.
    /// `formats` as in Bind (empty: all text; one: all; else per value);
    /// `declared` the Parse's parameter types (0 = inferred).
    pub fn group(&self, values: &[Option<&[u8]>], formats: &[i16], declared: &[u32]) -> Option<u32> {
        let mut group = None;
        for &g in &self.literal_groups {
            if *group.get_or_insert(g) != g {
                return None;
            }
        }
        for &i in &self.params {
            let value = (*values.get(i)?)?;
            let format = match formats.len() {
                0 => 0,
                1 => formats[0],
                _ => *formats.get(i)?,
            };
            let decl = declared.get(i).copied().unwrap_or(0);
            let h = match format {
                0 if decl == 0 || decl == self.table.type_oid || (is_int(decl) && is_int(self.table.type_oid)) => {
                    hash::hash_text(self.dist_type, value)?
                }
                // Binary: the bytes are in the declared (or inferred) type's
                // format, which must be the column's.
                1 if decl == 0 || decl == self.table.type_oid => hash::hash_binary(self.dist_type, value)?,
                _ => return None,
            };
            let g = self.table.shard_for(h)?.group;
            if *group.get_or_insert(g) != g {
                return None;
            }
        }
        group
    }
}

fn is_int(oid: u32) -> bool {
    matches!(oid, 20 | 21 | 23)
}

/// The result of analysing one query string.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub plan: Plan,
    /// Resolved an unqualified name through the client's search_path: the
    /// plan holds only for that search_path.
    pub uses_search_path: bool,
    /// The string is one plain transaction-control statement, which
    /// pgferry can answer itself when no server is bound (see
    /// [`TxControl`]).
    pub control: Option<TxControl>,
}

/// A lone BEGIN / COMMIT / ROLLBACK that pgferry may answer itself: a
/// transaction's BEGIN is replayed, exactly as the client sent it, on the
/// node its first statement chooses; a COMMIT or ROLLBACK of a transaction
/// that never ran a statement ends it without a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxControl {
    /// BEGIN or START TRANSACTION (with any options the grammar accepts:
    /// they cannot fail on a primary). The command tag to answer with.
    Begin(&'static str),
    Commit,
    Rollback,
}

impl Analysis {
    fn coordinator(why: &'static str) -> Self {
        Analysis {
            plan: Plan::Coordinator(why),
            uses_search_path: false,
            control: None,
        }
    }
}

/// The transaction-control meaning of a parsed one-statement string.
fn tx_control(parsed: &pg_query::ParseResult) -> Option<TxControl> {
    use pg_query::protobuf::TransactionStmtKind as K;
    let [raw] = parsed.protobuf.stmts.as_slice() else {
        return None;
    };
    let Some(N::TransactionStmt(t)) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
        return None;
    };
    if t.chain {
        return None;
    }
    match K::try_from(t.kind).ok()? {
        K::TransStmtBegin => Some(TxControl::Begin("BEGIN")),
        K::TransStmtStart => Some(TxControl::Begin("START TRANSACTION")),
        K::TransStmtCommit => Some(TxControl::Commit),
        K::TransStmtRollback => Some(TxControl::Rollback),
        _ => None,
    }
}

/// Analyses a query string (one or more statements).
pub fn analyze(sql: &str, snap: &Snapshot, search_path: Option<&[String]>) -> Analysis {
    analyze_with(sql, snap, search_path, None).expect("no template, no failure")
}

fn analyze_with(
    sql: &str,
    snap: &Snapshot,
    search_path: Option<&[String]>,
    template: Option<&Template>,
) -> Option<Analysis> {
    let parsed = match pg_query::parse(sql, pg_query::ParserOptions::default()) {
        Ok(p) => p,
        Err(_) => return Some(Analysis::coordinator("does not parse")),
    };
    // Anything that brings in another relation or runs a query inside:
    // subqueries (anywhere, CASE branches included), joins, CTEs, functions
    // in FROM, and more than one table reference. pg_query's own node walker
    // covers only some node types, so the whole tree is checked through its
    // serialized form (once per statement text: plans are cached).
    let Ok(tree) = serde_json::to_string(&parsed.protobuf) else {
        return Some(Analysis::coordinator("does not parse"));
    };
    const NESTED: [&str; 7] = [
        "{\"SubLink\":",
        "{\"RangeSubselect\":",
        "{\"RangeFunction\":",
        "{\"JoinExpr\":",
        "{\"CommonTableExpr\":",
        "{\"RangeTableSample\":",
        "{\"RangeTableFunc\":",
    ];
    if NESTED.iter().any(|k| tree.contains(k)) {
        return Some(Analysis::coordinator("subquery, join or CTE"));
    }
    if parsed.protobuf.stmts.len() == 1 && tree.matches("{\"RangeVar\":").count() > 1 {
        return Some(Analysis::coordinator("more than one table"));
    }
    let mut cx = Cx {
        snap,
        search_path,
        uses_search_path: false,
        functions_ok: functions_node_independent(&tree),
        template,
        template_failed: std::cell::Cell::new(false),
    };
    let control = tx_control(&parsed);
    let mut plan = Plan::Neutral;
    for raw in &parsed.protobuf.stmts {
        let Some(stmt) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
            continue;
        };
        let p = cx.statement(stmt);
        plan = match combine(plan, p) {
            Some(p) => p,
            None => return Some(Analysis::coordinator("statements for different groups")),
        };
    }
    if cx.template_failed.get() {
        return None;
    }
    Some(Analysis {
        plan,
        uses_search_path: cx.uses_search_path,
        control,
    })
}

/// The plan of two statements sent together (one transaction lands on one
/// node). None: they disagree.
fn combine(a: Plan, b: Plan) -> Option<Plan> {
    Some(match (a, b) {
        (Plan::Coordinator(w), _) | (_, Plan::Coordinator(w)) => Plan::Coordinator(w),
        (Plan::Neutral, p) | (p, Plan::Neutral) => p,
        (Plan::AnyPrimary, p) | (p, Plan::AnyPrimary) => p,
        (Plan::AnyNodeRead, p) | (p, Plan::AnyNodeRead) if !matches!(p, Plan::Params(_)) => p,
        (Plan::Group(a), Plan::Group(b)) if a == b => Plan::Group(a),
        (Plan::Params(_), _) | (_, Plan::Params(_)) => Plan::Coordinator("parameters in a multi-statement query"),
        _ => return None,
    })
}

struct Cx<'a> {
    snap: &'a Snapshot,
    search_path: Option<&'a [String]>,
    uses_search_path: bool,
    /// Every function called gives the same result on any node.
    functions_ok: bool,
    /// Making a template: key constants become "parameters" numbered by
    /// their place among the text's constants.
    template: Option<&'a Template>,
    template_failed: std::cell::Cell<bool>,
}

/// A query text with its constants taken out, found by PostgreSQL's own
/// scanner: texts that differ only in their constants (simple-protocol
/// statements with literal keys) share one analysis, and each text's key is
/// read from its constants (about 1 µs) instead of parsing it (about 15 µs).
#[derive(Debug)]
pub struct Template {
    /// The text with every constant replaced by a marker of its kind.
    pub key: Vec<u8>,
    /// Where each constant starts in the text (a leading minus sign
    /// included, as the parser places a negative constant).
    pub locations: Vec<i32>,
    /// Each constant's value as its type's input function reads it; None
    /// where the scanner's text cannot be read with certainty (escape
    /// strings, dollar quoting, backslashes).
    pub values: Vec<Option<String>>,
}

impl Template {
    /// Scans `sql`; None when it has no constant or has bind parameters.
    pub fn scan(sql: &str) -> Option<Template> {
        use pg_query::protobuf::Token;
        let tokens = pg_query::scan(sql).ok()?.tokens;
        let bytes = sql.as_bytes();
        let mut key = Vec::with_capacity(sql.len());
        let mut locations = Vec::new();
        let mut values = Vec::new();
        let mut copied = 0usize;
        let mut prev_minus: Option<usize> = None;
        for (i, t) in tokens.iter().enumerate() {
            let (start, end) = (t.start as usize, t.end as usize);
            if end > bytes.len() || start > end {
                return None;
            }
            let kind = Token::try_from(t.token).ok()?;
            let marker: &[u8] = match kind {
                Token::Param => return None,
                Token::Iconst => b"\0I",
                Token::Fconst => b"\0F",
                Token::Sconst => b"\0S",
                Token::Usconst | Token::Bconst | Token::Xconst => b"\0X",
                Token::Ascii45 => {
                    prev_minus = Some(i);
                    continue;
                }
                _ => {
                    prev_minus = None;
                    continue;
                }
            };
            let text = &sql[start..end];
            // A minus sign right before a number is part of the constant
            // (the parser folds it and places the constant at the sign).
            let (start, value) = match (kind, prev_minus) {
                (Token::Iconst | Token::Fconst, Some(m)) if tokens[m].end as usize == start => {
                    (tokens[m].start as usize, Some(format!("-{text}")))
                }
                (Token::Iconst | Token::Fconst, _) => (start, Some(text.to_owned())),
                (Token::Sconst, _) => (start, plain_string(text)),
                _ => (start, None),
            };
            prev_minus = None;
            key.extend_from_slice(&bytes[copied..start]);
            key.extend_from_slice(marker);
            copied = end;
            locations.push(start as i32);
            values.push(value);
        }
        if locations.is_empty() {
            return None;
        }
        key.extend_from_slice(&bytes[copied..]);
        Some(Template { key, locations, values })
    }
}

/// The value of a plain '...' string constant ('' for a quote); None for
/// escape strings, dollar quoting or a backslash (whose meaning depends on
/// standard_conforming_strings).
fn plain_string(text: &str) -> Option<String> {
    let inner = text.strip_prefix('\'')?.strip_suffix('\'')?;
    if inner.contains('\\') {
        return None;
    }
    Some(inner.replace("''", "'"))
}

/// Analyses `sql` as the template `t` (the plan's literal keys become
/// numbered constants). None when some key is not one of the constants.
pub fn analyze_template(sql: &str, t: &Template, snap: &Snapshot, search_path: Option<&[String]>) -> Option<Analysis> {
    analyze_with(sql, snap, search_path, Some(t))
}

/// Where a key comes from.
enum Key<'a> {
    /// A constant, its location in the text, and the type it is cast to.
    Literal(&'a Val, i32, Option<u32>),
    Param(usize),
}

impl Cx<'_> {
    fn statement(&mut self, stmt: &N) -> Plan {
        match stmt {
            N::TransactionStmt(t) => {
                use pg_query::protobuf::TransactionStmtKind as K;
                match K::try_from(t.kind) {
                    // Two-phase commit names a transaction on one node.
                    Ok(K::TransStmtPrepare | K::TransStmtCommitPrepared | K::TransStmtRollbackPrepared) => {
                        Plan::Coordinator("two-phase commit")
                    }
                    _ => Plan::Neutral,
                }
            }
            // SET / RESET: session parameters are kept per client and synced
            // to whichever server runs its next transaction.
            N::VariableSetStmt(_) | N::VariableShowStmt(_) => Plan::Neutral,
            N::SelectStmt(s) => self.select(s),
            N::UpdateStmt(u) => {
                if u.with_clause.is_some() || !u.from_clause.is_empty() {
                    return Plan::Coordinator("UPDATE ... FROM");
                }
                self.keyed(u.relation.as_ref(), u.where_clause.as_deref(), false)
            }
            N::DeleteStmt(d) => {
                if d.with_clause.is_some() || !d.using_clause.is_empty() {
                    return Plan::Coordinator("DELETE ... USING");
                }
                self.keyed(d.relation.as_ref(), d.where_clause.as_deref(), false)
            }
            N::InsertStmt(i) => self.insert(i),
            _ => Plan::Coordinator("not a single-table statement"),
        }
    }

    fn table(&mut self, rv: &pg_query::protobuf::RangeVar) -> Option<Arc<Table>> {
        if !rv.catalogname.is_empty() {
            return None;
        }
        let schema = (!rv.schemaname.is_empty()).then_some(rv.schemaname.as_str());
        // The answer for an unqualified name depends on the search_path,
        // known or not: the plan holds only for the one it was made under.
        if schema.is_none() {
            self.uses_search_path = true;
        }
        self.snap.resolve(schema, &rv.relname, self.search_path).cloned()
    }

    fn select(&mut self, s: &pg_query::protobuf::SelectStmt) -> Plan {
        use pg_query::protobuf::SetOperation;
        if s.op != SetOperation::SetopNone as i32 || s.with_clause.is_some() || s.into_clause.is_some() {
            return Plan::Coordinator("set operation, CTE or SELECT INTO");
        }
        // No table: a function call (Citus management functions among
        // them) or a VALUES list; only the coordinator is certain to do
        // what it means.
        if !s.values_lists.is_empty() || s.from_clause.is_empty() {
            return Plan::Coordinator("no table");
        }
        let [from] = s.from_clause.as_slice() else {
            return Plan::Coordinator("more than one table");
        };
        let Some(N::RangeVar(rv)) = &from.node else {
            return Plan::Coordinator("not a plain table");
        };
        let locks = !s.locking_clause.is_empty();
        self.keyed(Some(rv), s.where_clause.as_deref(), !locks)
    }

    /// SELECT / UPDATE / DELETE on one table: by its kind, and for hash
    /// tables by an equality on the distribution column among the WHERE
    /// clause's top-level conjuncts.
    fn keyed(&mut self, rv: Option<&pg_query::protobuf::RangeVar>, where_: Option<&Node>, read: bool) -> Plan {
        let Some(rv) = rv else {
            return Plan::Coordinator("no table");
        };
        let Some(table) = self.table(rv) else {
            return Plan::Coordinator("not a distributed table (or not certain which)");
        };
        match table.kind {
            TableKind::SingleShard { group } => return Plan::Group(group),
            TableKind::Reference if read => return Plan::AnyPrimary,
            TableKind::Hash => {}
            _ => return Plan::Coordinator("reference write or unroutable table"),
        }
        let any_node = read && self.functions_ok;
        let (Some(column), Some(ty)) = (table.column.as_deref(), table.dist_type) else {
            if any_node {
                return Plan::AnyNodeRead;
            }
            return Plan::Coordinator("distribution column type not hashed by pgferry");
        };
        let alias = rv.alias.as_ref().map(|a| a.aliasname.as_str());
        let mut conjuncts = Vec::new();
        if let Some(w) = where_ {
            flatten_and(w, &mut conjuncts);
        }
        let key = conjuncts
            .iter()
            .find_map(|c| key_equality(c, column, &rv.relname, alias));
        match key {
            Some(k) => match self.key_plan(&table, ty, &[k]) {
                // A key pgferry cannot place: still a read any node can run.
                Plan::Coordinator(_) if any_node => Plan::AnyNodeRead,
                p => p,
            },
            None if any_node => Plan::AnyNodeRead,
            None => Plan::Coordinator("no equality on the distribution column"),
        }
    }

    fn key_plan(&self, table: &Arc<Table>, ty: DistType, keys: &[Key]) -> Plan {
        let mut params = Vec::new();
        let mut literal_groups = Vec::new();
        for k in keys {
            match k {
                Key::Param(i) => params.push(*i),
                Key::Literal(v, at, cast) => {
                    let Some(text) = literal_text(v, ty) else {
                        return Plan::Coordinator("key literal of another type");
                    };
                    if cast.is_some_and(|c| !(c == table.type_oid || (is_int(c) && is_int(table.type_oid)))) {
                        return Plan::Coordinator("key cast to another type");
                    }
                    // A template for texts that differ only in constants:
                    // the key is the constant at this position, read from
                    // each text (see `Template`).
                    if let Some(t) = self.template {
                        match t.locations.iter().position(|l| *l == *at) {
                            Some(i) => {
                                params.push(i);
                                continue;
                            }
                            None => self.template_failed.set(true),
                        }
                    }
                    let Some(h) = hash::hash_text(ty, text.as_bytes()) else {
                        return Plan::Coordinator("key not hashed exactly");
                    };
                    let Some(r) = table.shard_for(h) else {
                        return Plan::Coordinator("no shard for the key");
                    };
                    literal_groups.push(r.group);
                }
            }
        }
        if params.is_empty() {
            let Some(&first) = literal_groups.first() else {
                return Plan::Coordinator("no key");
            };
            if literal_groups.iter().all(|&g| g == first) {
                Plan::Group(first)
            } else {
                Plan::Coordinator("rows for different groups")
            }
        } else {
            Plan::Params(Arc::new(ParamPlan {
                table: table.clone(),
                dist_type: ty,
                params,
                literal_groups,
            }))
        }
    }

    fn insert(&mut self, i: &pg_query::protobuf::InsertStmt) -> Plan {
        if i.with_clause.is_some() {
            return Plan::Coordinator("INSERT with a CTE");
        }
        let Some(rv) = i.relation.as_ref() else {
            return Plan::Coordinator("no table");
        };
        let Some(table) = self.table(rv) else {
            return Plan::Coordinator("not a distributed table (or not certain which)");
        };
        let cols: Vec<&str> = i
            .cols
            .iter()
            .filter_map(|c| match &c.node {
                Some(N::ResTarget(t)) if t.indirection.is_empty() => Some(t.name.as_str()),
                _ => None,
            })
            .collect();
        if cols.len() != i.cols.len() {
            return Plan::Coordinator("INSERT with an indirect column");
        }
        // Sequence defaults are drawn on the coordinator (on a worker, int
        // sequences fail and bigint ones give node-specific values): routed
        // only when the column list gives every sequence column a value.
        if !table.sequence_columns.is_empty()
            && (cols.is_empty() || table.sequence_columns.iter().any(|s| !cols.contains(&s.as_str())))
        {
            return Plan::Coordinator("INSERT relies on a sequence default");
        }
        let rows = match i.select_stmt.as_deref().and_then(|s| s.node.as_ref()) {
            Some(N::SelectStmt(s)) if !s.values_lists.is_empty() && s.with_clause.is_none() => &s.values_lists,
            _ => return Plan::Coordinator("INSERT ... SELECT"),
        };
        match table.kind {
            TableKind::SingleShard { group } => return Plan::Group(group),
            TableKind::Hash => {}
            _ => return Plan::Coordinator("reference write or unroutable table"),
        }
        if cols.is_empty() {
            return Plan::Coordinator("INSERT without a column list");
        }
        let (Some(column), Some(ty)) = (table.column.as_deref(), table.dist_type) else {
            return Plan::Coordinator("distribution column type not hashed by pgferry");
        };
        let Some(pos) = cols.iter().position(|c| *c == column) else {
            return Plan::Coordinator("INSERT without the distribution column");
        };
        let mut keys = Vec::with_capacity(rows.len());
        for row in rows {
            let Some(N::List(items)) = &row.node else {
                return Plan::Coordinator("unexpected VALUES row");
            };
            if items.items.len() != cols.len() {
                return Plan::Coordinator("VALUES row of another width");
            }
            match key_value(&items.items[pos]) {
                Some(k) => keys.push(k),
                None => return Plan::Coordinator("distribution key is an expression"),
            }
        }
        self.key_plan(&table, ty, &keys)
    }
}

/// Top-level AND conjuncts.
fn flatten_and<'a>(n: &'a Node, out: &mut Vec<&'a Node>) {
    if let Some(N::BoolExpr(b)) = &n.node {
        if b.boolop == pg_query::protobuf::BoolExprType::AndExpr as i32 {
            for a in &b.args {
                flatten_and(a, out);
            }
            return;
        }
    }
    out.push(n);
}

/// `col = value` or `value = col`, with col the distribution column
/// (bare, or qualified by the table's name or alias).
fn key_equality<'a>(n: &'a Node, column: &str, relname: &str, alias: Option<&str>) -> Option<Key<'a>> {
    let Some(N::AExpr(e)) = &n.node else { return None };
    if e.kind != pg_query::protobuf::AExprKind::AexprOp as i32 {
        return None;
    }
    let [op] = e.name.as_slice() else { return None };
    if !matches!(&op.node, Some(N::String(s)) if s.sval == "=") {
        return None;
    }
    let (l, r) = (e.lexpr.as_deref()?, e.rexpr.as_deref()?);
    let is_col = |x: &Node| is_column(x, column, relname, alias);
    if is_col(l) {
        key_value(r)
    } else if is_col(r) {
        key_value(l)
    } else {
        None
    }
}

fn is_column(n: &Node, column: &str, relname: &str, alias: Option<&str>) -> bool {
    let Some(N::ColumnRef(c)) = &n.node else { return false };
    let names: Vec<&str> = c
        .fields
        .iter()
        .filter_map(|f| match &f.node {
            Some(N::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect();
    if names.len() != c.fields.len() {
        return false;
    }
    match names.as_slice() {
        [col] => *col == column,
        [t, col] => *col == column && (Some(*t) == alias || (alias.is_none() && *t == relname)),
        _ => false,
    }
}

/// A literal or a parameter, possibly cast (`$1::bigint`, `'7'::int8`).
fn key_value(n: &Node) -> Option<Key<'_>> {
    match n.node.as_ref()? {
        N::AConst(c) if !c.isnull => Some(Key::Literal(c.val.as_ref()?, c.location, None)),
        N::ParamRef(p) if p.number >= 1 => Some(Key::Param(p.number as usize - 1)),
        N::TypeCast(tc) => {
            let ty = tc.type_name.as_ref()?;
            if !ty.typmods.is_empty() || !ty.array_bounds.is_empty() || ty.setof {
                return None;
            }
            let name = match ty.names.last()?.node.as_ref()? {
                N::String(s) => s.sval.as_str(),
                _ => return None,
            };
            let oid = type_oid(name)?;
            match key_value(tc.arg.as_deref()?)? {
                Key::Literal(v, at, None) => Some(Key::Literal(v, at, Some(oid))),
                // A cast parameter: its type is the cast's when undeclared;
                // only a cast to the column's own type (checked at Bind
                // through the declared type) is safe, so keep it simple.
                Key::Param(_) => None,
                Key::Literal(_, _, Some(_)) => None,
            }
        }
        _ => None,
    }
}

fn type_oid(name: &str) -> Option<u32> {
    Some(match name {
        "int2" | "smallint" => 21,
        "int4" | "integer" | "int" => 23,
        "int8" | "bigint" => 20,
        "text" => 25,
        "varchar" => 1043,
        "bpchar" => 1042,
        "uuid" => 2950,
        "numeric" => 1700,
        "date" => 1082,
        "timestamp" => 1114,
        "timestamptz" => 1184,
        "bool" | "boolean" => 16,
        _ => return None,
    })
}

/// A literal's text as the column's input function would see it, when
/// PostgreSQL would convert it to the column's type directly.
fn literal_text(v: &Val, ty: DistType) -> Option<String> {
    use DistType::*;
    match (v, ty) {
        (Val::Sval(s), _) => Some(s.sval.clone()),
        (Val::Ival(i), Int2 | Int4 | Int8 | Numeric) => Some(i.ival.to_string()),
        // Integers too large for int4 arrive as Float (text) constants.
        (Val::Fval(f), Int8 | Numeric) => Some(f.fval.clone()),
        (Val::Boolval(b), Bool) => Some(if b.boolval { "t" } else { "f" }.into()),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests;
