//! Statistical disclosure control of site reports: which subgroup cells may be published.
//!
//! A report publishes, per task, the overall counts and metrics and the same for each cell of
//! each subgroup field (`sex=F`). Suppressing only the small cells is not enough: when one cell of
//! a field is hidden, the overall count minus the published cells reveals it exactly (and its
//! positives, sensitivity and specificity with it). The method here, `threshold+complementary/v1`,
//! is the threshold rule with complementary (secondary) suppression on every marginal table:
//!
//! 1. **Primary**: a cell is suppressed when it has fewer than `min_cell_size` cases or, in any
//!    task, only one class (its metrics would be undefined and its labels disclosed).
//! 2. **Complementary**: while a field has exactly one suppressed cell, or its suppressed cells
//!    hold fewer than `min_cell_size` cases together, the smallest published cell of that field
//!    is suppressed too (so subtraction yields only a sum over at least two cells and at least
//!    `min_cell_size` cases).
//! 3. The decision is made once for all tasks, so the linked tables of a report (one per task,
//!    over the same cases) hide the same cells.
//!
//! Cases without a value of the field form an implicit cell that is never published but can be
//! derived by subtraction; when it is too small it counts as a hidden cell of its field.
//! Every published cell therefore has at least `min_cell_size` cases, and every number derivable
//! by subtracting published numbers within a field covers at least `min_cell_size` cases, so
//! counts need no rounding.
//!
//! **Intersections** (`sex=F&age_band=80+`) of every pair of fields are published only where cell
//! sizes allow all of them: every crossed cell, and every implicit cell of cases with one value
//! but not the other, passes the primary rule, and both fields' marginal cells are all
//! published. A crossed table is otherwise hidden whole. Nothing in a published crossed table is
//! then hidden, so neither its rows nor its columns can be subtracted to reveal a cell (partial
//! crossed tables would need suppression along rows and columns at once, which subtraction
//! chains can defeat). The minimum
//! cell size has a floor ([`MIN_CELL_FLOOR`]) no site can go below, identifiers are never
//! subgroups ([`IDENTIFIER_FIELDS`]), and the gate refuses reports made with a weaker method or a
//! smaller minimum cell than its policy asks.

use std::collections::BTreeMap;

use crate::{Error, Result};

/// The method this code applies, recorded in every report.
pub const METHOD: &str = "threshold+complementary/v1";

/// No report may publish cells smaller than this.
pub const MIN_CELL_FLOOR: usize = radfm_api::site_validation::MIN_CELL_FLOOR as usize;

pub use radfm_api::site_validation::IDENTIFIER_FIELDS;

/// The cells of one subgroup field, or of two crossed fields: value → the rows (case indices)
/// in that cell, and whether the cell is published.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldCells {
    /// Metadata field (`sex`), or two crossed fields (`sex&age_band`).
    pub field: String,
    /// Cells in value order.
    pub cells: Vec<Cell>,
}

/// One cell of a field.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// Value (`F`); for crossed fields the whole cell name (`sex=F&age_band=80+`).
    pub value: String,
    /// The cases in the cell.
    pub rows: Vec<usize>,
    /// Whether the cell may be published; for the implicit cell, whether it would pass.
    pub published: bool,
    /// The cases without a value of the field: never reported, but derivable by subtraction.
    pub implicit: bool,
}

impl Cell {
    fn new(value: String, rows: Vec<usize>, min_cell_size: usize, labels: &[&[bool]]) -> Cell {
        Cell {
            published: passes_primary(&rows, min_cell_size, labels),
            value,
            rows,
            implicit: false,
        }
    }
}

/// Separates crossed field names and cell names; never part of a field name.
pub const CROSS: char = '&';

/// Checks the disclosure settings a site asked for.
pub fn check_settings(fields: &[String], min_cell_size: usize) -> Result<()> {
    if min_cell_size < MIN_CELL_FLOOR {
        return Err(Error::Data(format!(
            "minimum cell size {min_cell_size} is below the floor of {MIN_CELL_FLOOR}"
        )));
    }
    if let Some(f) = fields
        .iter()
        .find(|f| IDENTIFIER_FIELDS.contains(&f.as_str()))
    {
        return Err(Error::Data(format!(
            "subgroup field {f:?} identifies patients or images and cannot be a subgroup"
        )));
    }
    if let Some(f) = fields.iter().find(|f| f.contains([CROSS, '='])) {
        return Err(Error::Data(format!(
            "subgroup field {f:?} contains '{CROSS}' or '=', which name cells"
        )));
    }
    Ok(())
}

/// Decides which cells of every field, and of every pair of fields, are published, for the
/// cases' subgroup values `groups` and the labels of every task (`labels[task][case]`).
pub fn plan(
    groups: &[BTreeMap<String, String>],
    fields: &[String],
    min_cell_size: usize,
    labels: &[&[bool]],
) -> Result<Vec<FieldCells>> {
    check_settings(fields, min_cell_size)?;
    if groups.len() < min_cell_size {
        return Err(Error::Data(format!(
            "{} cases are fewer than the minimum cell size {min_cell_size}: nothing can be reported",
            groups.len()
        )));
    }
    let marginals: Vec<FieldCells> = fields
        .iter()
        .map(|field| field_cells(groups, field, min_cell_size, labels))
        .collect();
    let mut crossed_tables = Vec::new();
    for (i, a) in marginals.iter().enumerate() {
        for b in &marginals[i + 1..] {
            crossed_tables.push(crossed(groups, a, b, min_cell_size, labels));
        }
    }
    Ok(marginals.into_iter().chain(crossed_tables).collect())
}

/// Each case's value of `field`, grouped: value → rows; and the rows without one.
fn by_value<'g>(
    groups: &'g [BTreeMap<String, String>],
    field: &str,
) -> (BTreeMap<&'g str, Vec<usize>>, Vec<usize>) {
    let mut values: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut missing = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        match g.get(field) {
            Some(v) => values.entry(v.as_str()).or_default().push(i),
            None => missing.push(i),
        }
    }
    (values, missing)
}

/// The crossed table of two fields, published whole or hidden whole (see the module docs).
fn crossed(
    groups: &[BTreeMap<String, String>],
    a: &FieldCells,
    b: &FieldCells,
    min_cell_size: usize,
    labels: &[&[bool]],
) -> FieldCells {
    let mut cells = Vec::new();
    let mut implicit_ok = true;
    for ca in a.cells.iter().filter(|c| !c.implicit) {
        let mut with_b = 0;
        for cb in b.cells.iter().filter(|c| !c.implicit) {
            let rows: Vec<usize> = ca
                .rows
                .iter()
                .copied()
                .filter(|&r| groups[r].get(&b.field) == Some(&cb.value))
                .collect();
            with_b += rows.len();
            let name = format!("{}={}{CROSS}{}={}", a.field, ca.value, b.field, cb.value);
            cells.push(Cell::new(name, rows, min_cell_size, labels));
        }
        let without_b: Vec<usize> = ca
            .rows
            .iter()
            .copied()
            .filter(|&r| !groups[r].contains_key(&b.field))
            .collect();
        debug_assert_eq!(with_b + without_b.len(), ca.rows.len());
        implicit_ok &= without_b.is_empty() || passes_primary(&without_b, min_cell_size, labels);
    }
    let (_, missing_a) = by_value(groups, &a.field);
    let mut without_a: BTreeMap<Option<&String>, Vec<usize>> = BTreeMap::new();
    for r in missing_a {
        without_a
            .entry(groups[r].get(&b.field))
            .or_default()
            .push(r);
    }
    implicit_ok &= without_a
        .values()
        .all(|rows| passes_primary(rows, min_cell_size, labels));
    let whole = implicit_ok
        && a.cells.iter().chain(&b.cells).all(|c| c.published)
        && cells.iter().all(|c| c.published);
    cells.retain(|c| !c.rows.is_empty());
    cells.iter_mut().for_each(|c| c.published = whole);
    FieldCells {
        field: format!("{}{CROSS}{}", a.field, b.field),
        cells,
    }
}

fn field_cells(
    groups: &[BTreeMap<String, String>],
    field: &str,
    min_cell_size: usize,
    labels: &[&[bool]],
) -> FieldCells {
    let (values, missing) = by_value(groups, field);
    let mut cells: Vec<Cell> = values
        .into_iter()
        .map(|(value, rows)| Cell::new(value.to_string(), rows, min_cell_size, labels))
        .collect();
    if !missing.is_empty() {
        let implicit = Cell::new(String::new(), missing, min_cell_size, labels);
        cells.push(Cell {
            implicit: true,
            ..implicit
        });
    }
    complementary(&mut cells, min_cell_size);
    FieldCells {
        field: field.to_string(),
        cells,
    }
}

fn passes_primary(rows: &[usize], min_cell_size: usize, labels: &[&[bool]]) -> bool {
    rows.len() >= min_cell_size && both_classes(rows, labels)
}

fn both_classes(rows: &[usize], labels: &[&[bool]]) -> bool {
    labels.iter().all(|task| {
        let positives = rows.iter().filter(|&&r| task[r]).count();
        positives > 0 && positives < rows.len()
    })
}

/// Suppresses the smallest published cells until subtraction cannot isolate a hidden one.
fn complementary(cells: &mut [Cell], min_cell_size: usize) {
    loop {
        let hidden: Vec<&Cell> = cells.iter().filter(|c| !c.published).collect();
        let hidden_cases: usize = hidden.iter().map(|c| c.rows.len()).sum();
        let exposed = hidden.len() == 1 || (!hidden.is_empty() && hidden_cases < min_cell_size);
        if !exposed {
            return;
        }
        let Some(smallest) = cells
            .iter_mut()
            .filter(|c| c.published && !c.implicit)
            .min_by_key(|c| c.rows.len())
        else {
            return;
        };
        smallest.published = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(values: &[(&str, usize)]) -> Vec<BTreeMap<String, String>> {
        values
            .iter()
            .flat_map(|&(v, n)| std::iter::repeat_n(v, n))
            .map(|v| BTreeMap::from([("f".to_string(), v.to_string())]))
            .collect()
    }

    fn alternating(n: usize) -> Vec<bool> {
        (0..n).map(|i| i % 2 == 0).collect()
    }

    fn published(values: &[(&str, usize)]) -> Vec<String> {
        let g = groups(values);
        let y = alternating(g.len());
        plan(&g, &["f".into()], 10, &[&y]).unwrap()[0]
            .cells
            .iter()
            .filter(|c| c.published)
            .map(|c| c.value.clone())
            .collect()
    }

    #[test]
    fn one_small_cell_takes_the_smallest_other_cell_with_it() {
        type Cells<'a> = &'a [(&'a str, usize)];
        let table: &[(Cells, &[&str])] = &[
            (&[("F", 50), ("M", 10)], &["F", "M"]),
            (&[("F", 50), ("M", 4)], &[]),
            (&[("a", 40), ("b", 20), ("c", 3)], &["a"]),
            (&[("a", 40), ("b", 20), ("c", 3), ("d", 4)], &["a"]),
            (&[("a", 40), ("b", 20), ("c", 6), ("d", 6)], &["a", "b"]),
            (&[("a", 40), ("b", 20), ("c", 1), ("d", 1)], &["a"]),
        ];
        for (values, want) in table {
            assert_eq!(published(values), *want, "{values:?}");
        }
    }

    /// Whatever the cells, the overall count minus the published cells of a field is either zero
    /// or a sum over at least two hidden cells holding at least the minimum cell size.
    #[test]
    fn no_hidden_cell_can_be_recovered_by_subtraction() {
        let mut state = 7u64;
        for _ in 0..500 {
            let cells = 1 + (state % 6) as usize;
            let values: Vec<(String, usize)> = (0..cells)
                .map(|c| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (format!("v{c}"), 1 + (state >> 33) as usize % 40)
                })
                .collect();
            let values: Vec<(&str, usize)> = values.iter().map(|(v, n)| (v.as_str(), *n)).collect();
            let g = groups(&values);
            if g.len() < 10 {
                continue;
            }
            let y = alternating(g.len());
            let plan = plan(&g, &["f".into()], 10, &[&y]).unwrap();
            let hidden: Vec<&Cell> = plan[0].cells.iter().filter(|c| !c.published).collect();
            let hidden_cases: usize = hidden.iter().map(|c| c.rows.len()).sum();
            assert!(
                hidden.is_empty() || (hidden.len() >= 2 && hidden_cases >= 10),
                "{values:?}: hidden {hidden:?}"
            );
            assert!(
                plan[0]
                    .cells
                    .iter()
                    .all(|c| !c.published || c.rows.len() >= 10)
            );
        }
    }

    /// Cases of (sex, age) in the given numbers; an empty value means the case lacks the field.
    fn crossed_groups(cells: &[(&str, &str, usize)]) -> Vec<BTreeMap<String, String>> {
        let case = |sex: &str, age: &str| {
            [("sex", sex), ("age", age)]
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(f, v)| (f.to_string(), v.to_string()))
                .collect()
        };
        cells
            .iter()
            .flat_map(|&(sex, age, n)| std::iter::repeat_n(case(sex, age), n))
            .collect()
    }

    fn published_names(g: &[BTreeMap<String, String>]) -> Vec<String> {
        let y = alternating(g.len());
        let fields = ["sex".to_string(), "age".to_string()];
        plan(g, &fields, 10, &[&y])
            .unwrap()
            .iter()
            .flat_map(|f| {
                f.cells
                    .iter()
                    .filter(|c| c.published && !c.implicit)
                    .map(|c| match f.field.contains(CROSS) {
                        true => c.value.clone(),
                        false => format!("{}={}", f.field, c.value),
                    })
            })
            .collect()
    }

    #[test]
    fn cases_without_a_value_are_a_cell_that_subtraction_would_reveal() {
        let g = crossed_groups(&[("F", "y", 50), ("M", "y", 30), ("", "y", 4)]);
        assert_eq!(
            published_names(&g),
            ["sex=F", "age=y"],
            "4 cases lack sex: 84 - 50 - 30 would reveal them, so sex=M is hidden with them"
        );
    }

    #[test]
    fn intersections_are_published_only_where_every_cell_allows() {
        let all = ["sex=F", "sex=M", "age=o", "age=y"];
        let crossed = ["sex=F&age=o", "sex=F&age=y", "sex=M&age=o", "sex=M&age=y"];
        let both: Vec<&str> = all.iter().chain(&crossed).copied().collect();
        type Table<'a> = &'a [(&'a str, &'a str, usize)];
        let cases: &[(Table, &[&str], &str)] = &[
            (
                &[
                    ("F", "y", 20),
                    ("F", "o", 20),
                    ("M", "y", 20),
                    ("M", "o", 20),
                ],
                &both,
                "every cell is large",
            ),
            (
                &[
                    ("F", "y", 40),
                    ("F", "o", 4),
                    ("M", "y", 20),
                    ("M", "o", 20),
                ],
                &all,
                "F&o has 4 cases; F (44) - F&y (40) would reveal it",
            ),
            (
                &[
                    ("F", "y", 20),
                    ("F", "o", 20),
                    ("M", "y", 20),
                    ("M", "o", 20),
                    ("F", "", 3),
                ],
                &["sex=F", "sex=M", "age=y"],
                "3 women lack an age: age=o is hidden with them, and the crossed table",
            ),
            (
                &[
                    ("F", "y", 20),
                    ("F", "o", 20),
                    ("M", "y", 20),
                    ("M", "o", 20),
                    ("F", "", 3),
                    ("M", "", 20),
                ],
                &all,
                "23 lack an age, enough for the marginals; F - F&o - F&y would reveal 3",
            ),
            (
                &[
                    ("F", "y", 20),
                    ("F", "o", 20),
                    ("M", "y", 20),
                    ("M", "o", 20),
                    ("", "", 3),
                ],
                &["sex=M", "age=y"],
                "3 cases lack both: each field hides a cell with them, and the crossed table",
            ),
        ];
        for (table, want, why) in cases {
            assert_eq!(published_names(&crossed_groups(table)), *want, "{why}");
        }
    }

    #[test]
    fn a_cell_with_one_class_in_any_task_is_hidden_in_every_task() {
        let g = groups(&[("a", 20), ("b", 20), ("c", 20)]);
        let all_positive_in_b: Vec<bool> = (0..60)
            .map(|i| (20..40).contains(&i) || i % 2 == 0)
            .collect();
        let other = alternating(60);
        let plan = plan(&g, &["f".into()], 10, &[&other, &all_positive_in_b]).unwrap();
        let shown: Vec<&str> = plan[0]
            .cells
            .iter()
            .filter(|c| c.published)
            .map(|c| c.value.as_str())
            .collect();
        assert_eq!(shown, ["c"], "b has one class in task 2, a goes with it");
    }

    #[test]
    fn settings_below_the_floor_or_identifying_fields_are_refused() {
        let g = groups(&[("a", 30)]);
        let y = alternating(30);
        let e = plan(&g, &["f".into()], 5, &[&y]).unwrap_err().to_string();
        assert!(e.contains("below the floor of 10"), "{e}");
        let e = plan(&g, &["patient".into()], 10, &[&y])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"patient\" identifies patients"), "{e}");
        let e = plan(&groups(&[("a", 8)]), &["f".into()], 10, &[&alternating(8)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("8 cases are fewer"), "{e}");
        let e = plan(&g, &["sex&age".into()], 10, &[&y])
            .unwrap_err()
            .to_string();
        assert!(e.contains("which name cells"), "{e}");
    }
}
