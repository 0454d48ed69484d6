//! Interest management: the spatial cells that partition a world.
//!
//! A world with a position field is cut into square cells on its x/y plane.
//! Relays split each tick's snapshot into per-cell snapshots once, code each
//! cell's delta once per (cell, baseline, tick), and send every client the
//! cells within its radius. Because the [`crate::StateHash`] is a sum over
//! entities, the hash of the cells a client holds is the sum of their hashes.
//!
//! Worlds without a position field have a single cell, [`CellId::WORLD`].

use crate::msg::CellId;
use crate::schema::Layout;
use crate::snapshot::Snapshot;
use std::collections::BTreeMap;

/// Most cells, across, that one interest query may cover: bounds the work a
/// client's radius can ask of a relay.
pub const MAX_CELLS_ACROSS: i64 = 64;

/// A square grid over a world's x/y plane.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Grid {
    cell_size: f64,
}

impl Grid {
    /// A grid of `cell_size`-metre cells (in the units of the position
    /// fields after dequantization). Sizes that are not finite and positive
    /// are replaced by 1.
    pub fn new(cell_size: f64) -> Grid {
        let cell_size = if cell_size.is_finite() && cell_size > 0.0 {
            cell_size
        } else {
            1.0
        };
        Grid { cell_size }
    }

    /// Cell edge length.
    pub fn cell_size(&self) -> f64 {
        self.cell_size
    }

    /// The cell holding point `(x, y)`.
    pub fn cell_at(&self, x: f64, y: f64) -> CellId {
        let clamp = |v: f64| {
            (v / self.cell_size)
                .floor()
                .clamp(i32::MIN as f64, i32::MAX as f64)
        };
        CellId {
            x: clamp(x) as i32,
            y: clamp(y) as i32,
        }
    }

    /// The cell of the entity at `index`, or [`CellId::WORLD`] for worlds
    /// without a position.
    pub fn cell_of(&self, layout: &Layout, snapshot: &Snapshot, index: usize) -> CellId {
        match position(layout, snapshot, index) {
            Some((x, y)) => self.cell_at(x, y),
            None => CellId::WORLD,
        }
    }

    /// Splits a snapshot into per-cell snapshots.
    pub fn split(&self, layout: &Layout, snapshot: &Snapshot) -> BTreeMap<CellId, Snapshot> {
        let mut members: BTreeMap<CellId, Vec<usize>> = BTreeMap::new();
        for i in 0..snapshot.len() {
            members
                .entry(self.cell_of(layout, snapshot, i))
                .or_default()
                .push(i);
        }
        members
            .into_iter()
            .map(|(cell, indexes)| (cell, snapshot.select(indexes)))
            .collect()
    }

    /// The cells that a circle of `radius` around `(x, y)` touches, at most
    /// [`MAX_CELLS_ACROSS`] cells across (a larger radius is cut down).
    pub fn cells_within(&self, x: f64, y: f64, radius: f64) -> Vec<CellId> {
        let radius = if radius.is_finite() {
            radius.max(0.0)
        } else {
            0.0
        };
        let reach = ((radius / self.cell_size).ceil() as i64).min(MAX_CELLS_ACROSS / 2);
        let center = self.cell_at(x, y);
        let mut out = Vec::new();
        for dy in -reach..=reach {
            for dx in -reach..=reach {
                let cx = center.x as i64 + dx;
                let cy = center.y as i64 + dy;
                if cx < i32::MIN as i64 || cx > i32::MAX as i64 {
                    continue;
                }
                if cy < i32::MIN as i64 || cy > i32::MAX as i64 {
                    continue;
                }
                // Distance from the centre to the nearest point of the cell.
                let (x0, y0) = (cx as f64 * self.cell_size, cy as f64 * self.cell_size);
                let nx = x.clamp(x0, x0 + self.cell_size);
                let ny = y.clamp(y0, y0 + self.cell_size);
                if (nx - x).powi(2) + (ny - y).powi(2) <= radius * radius {
                    out.push(CellId {
                        x: cx as i32,
                        y: cy as i32,
                    });
                }
            }
        }
        out
    }
}

/// The dequantized x/y position of the entity at `index`, if the world has a
/// position.
pub fn position(layout: &Layout, snapshot: &Snapshot, index: usize) -> Option<(f64, f64)> {
    let fields = layout.position_fields();
    if fields.len() < 2 {
        return None;
    }
    let lanes = snapshot.lanes(index);
    let slots = layout.fields();
    let x = layout.dequantize(fields[0], lanes[slots[fields[0]].lane]);
    let y = layout.dequantize(fields[1], lanes[slots[fields[1]].lane]);
    Some((x, y))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Component, Encoding, Field, Position, Schema};

    fn layout() -> Layout {
        Schema {
            name: "flat".into(),
            components: vec![Component {
                name: "p".into(),
                fields: vec![
                    Field {
                        name: "x".into(),
                        encoding: Encoding::Float {
                            min: -100.0,
                            max: 100.0,
                            bits: 16,
                        },
                    },
                    Field {
                        name: "y".into(),
                        encoding: Encoding::Int {
                            min: -100,
                            max: 100,
                        },
                    },
                ],
            }],
            position: Some(Position {
                fields: vec!["p.x".into(), "p.y".into()],
            }),
            max_entities: 100,
        }
        .layout()
        .unwrap()
    }

    #[test]
    fn split_partitions_and_hashes_add_up() {
        let l = layout();
        let rows: Vec<(u32, Vec<u32>)> = (0..40)
            .map(|i| {
                let x = l.quantize_float(0, -90.0 + i as f64 * 4.5);
                let y = l.quantize_int(1, (i as i64 * 7) % 200 - 100);
                (i, vec![x, y])
            })
            .collect();
        let snap =
            Snapshot::from_entities(&l, rows.iter().map(|(id, v)| (*id, &v[..], &[][..]))).unwrap();
        let grid = Grid::new(25.0);
        let cells = grid.split(&l, &snap);
        assert!(cells.len() > 4);
        assert_eq!(cells.values().map(Snapshot::len).sum::<usize>(), snap.len());
        let sum = cells
            .values()
            .fold(crate::StateHash(0), |acc, c| acc.combine(c.hash()));
        assert_eq!(sum, snap.hash());
        for (cell, part) in &cells {
            for i in 0..part.len() {
                assert_eq!(grid.cell_of(&l, part, i), *cell);
            }
        }
    }

    #[test]
    fn cells_within_covers_the_circle_and_is_bounded() {
        let grid = Grid::new(10.0);
        let cells = grid.cells_within(5.0, 5.0, 12.0);
        assert!(cells.contains(&CellId { x: 0, y: 0 }));
        assert!(cells.contains(&CellId { x: 1, y: 0 }));
        assert!(cells.contains(&CellId { x: -1, y: -1 }));
        assert!(!cells.contains(&CellId { x: 2, y: 2 }));
        let huge = grid.cells_within(0.0, 0.0, 1e12);
        assert!(huge.len() <= ((MAX_CELLS_ACROSS + 1) * (MAX_CELLS_ACROSS + 1)) as usize);
        assert_eq!(grid.cells_within(0.0, 0.0, f64::NAN).len(), 1);
    }
}
