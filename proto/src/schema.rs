//! World schemas: which fields an entity has and how each one is quantized.
//!
//! A [`Schema`] is plain data (serde), so it travels on the wire at
//! subscription time and lives in files; relays need no application code to
//! handle a world. [`Schema::layout`] checks it and compiles it to a
//! [`Layout`]: the flat list of integer *lanes* that every entity of the world
//! carries, which is what snapshots store and what the delta codec codes.
//!
//! Every entity of a world has every component of its schema (components group
//! fields by meaning; they are not optional parts).

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;

/// Largest number of fields a schema may declare, over all components.
pub const MAX_FIELDS: usize = 64;
/// Largest number of bits of one quantized lane.
pub const MAX_LANE_BITS: u8 = 32;
/// Largest `max_len` of a bytes field.
pub const MAX_BYTES_LEN: u32 = 4096;
/// Largest number of entities a world may declare.
pub const MAX_ENTITIES: u32 = 1 << 20;
/// Longest name (world, component or field) in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// A world's declaration of its entities.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// Name of the world kind, e.g. `cubes`.
    pub name: String,
    /// Components, each a named group of fields.
    pub components: Vec<Component>,
    /// The fields that give an entity's position, used for interest
    /// management (spatial cells). `None` for worlds without positions.
    #[serde(default)]
    pub position: Option<Position>,
    /// Most entities a snapshot of this world may hold. Decoders reject more.
    pub max_entities: u32,
}

/// A named group of fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    /// Component name, e.g. `transform`.
    pub name: String,
    /// Its fields, in wire order.
    pub fields: Vec<Field>,
}

/// One typed field of a component.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// Field name, unique within its component.
    pub name: String,
    /// How the field is quantized and coded.
    pub encoding: Encoding,
}

/// The wire encoding of one field.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Encoding {
    /// A float quantized uniformly to `bits` bits over `[min, max]`.
    Float {
        /// Smallest representable value.
        min: f64,
        /// Largest representable value.
        max: f64,
        /// Bits of the quantized value, 1 to 32.
        bits: u8,
    },
    /// A rotation quaternion in smallest-three form: the index of the largest
    /// component (2 bits) and the other three, each quantized to `bits` bits
    /// over `[-1/sqrt(2), 1/sqrt(2)]`.
    Quat {
        /// Bits per stored component, 2 to 32.
        bits: u8,
    },
    /// An integer in `[min, max]` (at most 2^32 distinct values).
    Int {
        /// Smallest value.
        min: i64,
        /// Largest value.
        max: i64,
    },
    /// A boolean.
    Bool,
    /// A byte string of at most `max_len` bytes.
    Bytes {
        /// Longest allowed length, at most [`MAX_BYTES_LEN`].
        max_len: u32,
    },
}

/// Which fields hold an entity's position: two or three `component.field`
/// paths naming float or integer fields (x, y and optionally z).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    /// Field paths, `component.field`, in x, y (, z) order.
    pub fields: Vec<String>,
}

/// Why a schema was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// The schema declares no field at all.
    #[error("schema declares no field")]
    NoFields,
    /// More than [`MAX_FIELDS`] fields.
    #[error("schema declares {0} fields, at most {MAX_FIELDS} are allowed")]
    TooManyFields(usize),
    /// A name is empty or too long.
    #[error("name {0:?} must be 1 to {MAX_NAME_LEN} bytes")]
    BadName(String),
    /// Two components, or two fields of one component, share a name.
    #[error("duplicate name {0:?}")]
    DuplicateName(String),
    /// A field's encoding parameters are out of range.
    #[error("field {field}: {reason}")]
    BadEncoding {
        /// `component.field`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// `max_entities` is 0 or above [`MAX_ENTITIES`].
    #[error("max_entities {0} must be 1 to {MAX_ENTITIES}")]
    BadMaxEntities(u32),
    /// The position names a missing field, or one that is not a number.
    #[error("position: {0}")]
    BadPosition(String),
}

/// What one lane holds, for the codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneKind {
    /// A quantized number in `[0, max]`, coded in `bits` bits.
    Number {
        /// Largest valid value.
        max: u32,
        /// Bits needed to hold `max`.
        bits: u8,
    },
    /// The 2-bit index of a quaternion's largest component.
    QuatLargest,
    /// One of the three stored quaternion components, in `[0, max]`.
    QuatComponent {
        /// Largest valid value.
        max: u32,
        /// Bits per component.
        bits: u8,
    },
    /// 0 or 1.
    Bool,
}

impl LaneKind {
    /// Largest valid value of the lane.
    pub fn max(self) -> u32 {
        match self {
            LaneKind::Number { max, .. } | LaneKind::QuatComponent { max, .. } => max,
            LaneKind::QuatLargest => 3,
            LaneKind::Bool => 1,
        }
    }

    /// Bits that hold any valid value.
    pub fn bits(self) -> u8 {
        match self {
            LaneKind::Number { bits, .. } | LaneKind::QuatComponent { bits, .. } => bits,
            LaneKind::QuatLargest => 2,
            LaneKind::Bool => 1,
        }
    }
}

/// Where one field lives in an entity's storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldSlot {
    /// Index of the first lane of the field (for lane-stored fields).
    pub lane: usize,
    /// Number of lanes: 1 for numbers and bools, 4 for quaternions, 0 for bytes.
    pub lanes: usize,
    /// For bytes fields, the index among the entity's blobs.
    pub blob: Option<usize>,
    /// For bytes fields, the longest allowed length.
    pub max_len: u32,
}

/// A checked schema compiled to lanes: what snapshots and the codec work on.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    schema: Schema,
    lanes: Vec<LaneKind>,
    fields: Vec<FieldSlot>,
    encodings: Vec<Encoding>,
    paths: Vec<String>,
    blobs: usize,
    position: Vec<usize>,
}

impl Schema {
    /// Checks the schema and compiles it to a [`Layout`].
    pub fn layout(&self) -> Result<Layout, SchemaError> {
        Layout::new(self.clone())
    }

    /// Total number of fields over all components.
    pub fn field_count(&self) -> usize {
        self.components.iter().map(|c| c.fields.len()).sum()
    }
}

fn check_name(name: &str) -> Result<(), SchemaError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(SchemaError::BadName(name.to_string()));
    }
    Ok(())
}

/// Bits needed to represent `max` (at least 1).
pub fn bits_for(max: u32) -> u8 {
    (32 - max.leading_zeros()).max(1) as u8
}

impl Layout {
    fn new(schema: Schema) -> Result<Layout, SchemaError> {
        check_name(&schema.name)?;
        let count = schema.field_count();
        if count == 0 {
            return Err(SchemaError::NoFields);
        }
        if count > MAX_FIELDS {
            return Err(SchemaError::TooManyFields(count));
        }
        if schema.max_entities == 0 || schema.max_entities > MAX_ENTITIES {
            return Err(SchemaError::BadMaxEntities(schema.max_entities));
        }
        let mut lanes = Vec::new();
        let mut fields = Vec::new();
        let mut encodings = Vec::new();
        let mut paths = Vec::new();
        let mut blobs = 0;
        let mut component_names = HashSet::new();
        for component in &schema.components {
            check_name(&component.name)?;
            if !component_names.insert(component.name.as_str()) {
                return Err(SchemaError::DuplicateName(component.name.clone()));
            }
            let mut field_names = HashSet::new();
            for field in &component.fields {
                check_name(&field.name)?;
                let path = format!("{}.{}", component.name, field.name);
                if !field_names.insert(field.name.as_str()) {
                    return Err(SchemaError::DuplicateName(path));
                }
                let bad = |reason: &str| SchemaError::BadEncoding {
                    field: path.clone(),
                    reason: reason.to_string(),
                };
                let lane = lanes.len();
                let mut slot = FieldSlot {
                    lane,
                    lanes: 1,
                    blob: None,
                    max_len: 0,
                };
                match field.encoding {
                    Encoding::Float { min, max, bits } => {
                        if !(min.is_finite() && max.is_finite() && min < max) {
                            return Err(bad("float range must be finite with min < max"));
                        }
                        if bits == 0 || bits > MAX_LANE_BITS {
                            return Err(bad("float bits must be 1 to 32"));
                        }
                        let max = if bits == 32 {
                            u32::MAX
                        } else {
                            (1u32 << bits) - 1
                        };
                        lanes.push(LaneKind::Number { max, bits });
                    }
                    Encoding::Quat { bits } => {
                        if !(2..=MAX_LANE_BITS).contains(&bits) {
                            return Err(bad("quaternion bits must be 2 to 32"));
                        }
                        let max = if bits == 32 {
                            u32::MAX
                        } else {
                            (1u32 << bits) - 1
                        };
                        lanes.push(LaneKind::QuatLargest);
                        for _ in 0..3 {
                            lanes.push(LaneKind::QuatComponent { max, bits });
                        }
                        slot.lanes = 4;
                    }
                    Encoding::Int { min, max } => {
                        if min > max {
                            return Err(bad("integer range must have min <= max"));
                        }
                        let span = (max as i128) - (min as i128);
                        if span > u32::MAX as i128 {
                            return Err(bad("integer range must span at most 2^32 values"));
                        }
                        let span = span as u32;
                        lanes.push(LaneKind::Number {
                            max: span,
                            bits: bits_for(span),
                        });
                    }
                    Encoding::Bool => lanes.push(LaneKind::Bool),
                    Encoding::Bytes { max_len } => {
                        if max_len > MAX_BYTES_LEN {
                            return Err(bad("bytes max_len must be at most 4096"));
                        }
                        slot.lanes = 0;
                        slot.blob = Some(blobs);
                        slot.max_len = max_len;
                        blobs += 1;
                    }
                }
                fields.push(slot);
                encodings.push(field.encoding);
                paths.push(path);
            }
        }
        let mut position = Vec::new();
        if let Some(pos) = &schema.position {
            if !(2..=3).contains(&pos.fields.len()) {
                return Err(SchemaError::BadPosition(
                    "needs two or three fields (x, y, z)".into(),
                ));
            }
            for name in &pos.fields {
                let index = paths
                    .iter()
                    .position(|p| p == name)
                    .ok_or_else(|| SchemaError::BadPosition(format!("no field {name:?}")))?;
                match encodings[index] {
                    Encoding::Float { .. } | Encoding::Int { .. } => position.push(index),
                    _ => {
                        return Err(SchemaError::BadPosition(format!(
                            "{name:?} is not a float or integer field"
                        )));
                    }
                }
            }
        }
        Ok(Layout {
            schema,
            lanes,
            fields,
            encodings,
            paths,
            blobs,
            position,
        })
    }

    /// The schema this layout was compiled from.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Lanes of one entity, in storage and wire order.
    pub fn lanes(&self) -> &[LaneKind] {
        &self.lanes
    }

    /// Number of lanes per entity.
    pub fn lane_count(&self) -> usize {
        self.lanes.len()
    }

    /// Number of bytes fields (blobs) per entity.
    pub fn blob_count(&self) -> usize {
        self.blobs
    }

    /// Where each field lives, in schema order (components flattened).
    pub fn fields(&self) -> &[FieldSlot] {
        &self.fields
    }

    /// The encoding of field `index`.
    pub fn encoding(&self, index: usize) -> Encoding {
        self.encodings[index]
    }

    /// Index of the field named `component.field`.
    pub fn field_index(&self, path: &str) -> Option<usize> {
        self.paths.iter().position(|p| p == path)
    }

    /// `component.field` path of field `index`.
    pub fn field_path(&self, index: usize) -> &str {
        &self.paths[index]
    }

    /// Indexes of the position fields (empty when the world has none).
    pub fn position_fields(&self) -> &[usize] {
        &self.position
    }

    /// Most entities a snapshot may hold.
    pub fn max_entities(&self) -> usize {
        self.schema.max_entities as usize
    }

    /// Quantizes a float for field `index` (a `Float` field).
    ///
    /// # Panics
    /// If the field is not a float field.
    pub fn quantize_float(&self, index: usize, value: f64) -> u32 {
        match self.encodings[index] {
            Encoding::Float { min, max, bits } => crate::quant::quantize(value, min, max, bits),
            other => panic!("field {} is {other:?}, not a float", self.paths[index]),
        }
    }

    /// Dequantizes the value of a `Float` or `Int` field stored in a lane.
    pub fn dequantize(&self, index: usize, lane: u32) -> f64 {
        match self.encodings[index] {
            Encoding::Float { min, max, bits } => crate::quant::dequantize(lane, min, max, bits),
            Encoding::Int { min, .. } => (min as i128 + lane as i128) as f64,
            Encoding::Bool => lane as f64,
            Encoding::Quat { .. } | Encoding::Bytes { .. } => f64::NAN,
        }
    }

    /// Stores an integer for field `index` (an `Int` field), clamped to its range.
    pub fn quantize_int(&self, index: usize, value: i64) -> u32 {
        match self.encodings[index] {
            Encoding::Int { min, max } => (value.clamp(min, max) as i128 - min as i128) as u32,
            other => panic!("field {} is {other:?}, not an integer", self.paths[index]),
        }
    }
}

impl fmt::Display for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (", self.name)?;
        for (i, c) in self.components.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{}:", c.name)?;
            for field in &c.fields {
                write!(f, " {}", field.name)?;
            }
        }
        write!(f, ")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Schema {
        Schema {
            name: "sample".into(),
            components: vec![
                Component {
                    name: "transform".into(),
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
                            encoding: Encoding::Int { min: -5, max: 1000 },
                        },
                        Field {
                            name: "rot".into(),
                            encoding: Encoding::Quat { bits: 9 },
                        },
                    ],
                },
                Component {
                    name: "meta".into(),
                    fields: vec![
                        Field {
                            name: "on".into(),
                            encoding: Encoding::Bool,
                        },
                        Field {
                            name: "tag".into(),
                            encoding: Encoding::Bytes { max_len: 16 },
                        },
                    ],
                },
            ],
            position: Some(Position {
                fields: vec!["transform.x".into(), "transform.y".into()],
            }),
            max_entities: 1000,
        }
    }

    #[test]
    fn layout_maps_fields_to_lanes() {
        let layout = sample().layout().unwrap();
        assert_eq!(layout.lane_count(), 1 + 1 + 4 + 1);
        assert_eq!(layout.blob_count(), 1);
        assert_eq!(layout.fields()[2].lane, 2);
        assert_eq!(layout.fields()[2].lanes, 4);
        assert_eq!(
            layout.lanes()[1],
            LaneKind::Number {
                max: 1005,
                bits: 10
            }
        );
        assert_eq!(layout.position_fields(), &[0, 1]);
        assert_eq!(layout.field_index("meta.tag"), Some(4));
    }

    #[test]
    fn schema_round_trips_through_json_and_postcard() {
        let schema = sample();
        let json = serde_json::to_string(&schema).unwrap();
        assert_eq!(serde_json::from_str::<Schema>(&json).unwrap(), schema);
        let bin = postcard::to_allocvec(&schema).unwrap();
        assert_eq!(postcard::from_bytes::<Schema>(&bin).unwrap(), schema);
    }

    #[test]
    fn bad_schemas_are_refused_with_reasons() {
        let mut s = sample();
        s.components[0].fields[0].encoding = Encoding::Float {
            min: 1.0,
            max: 1.0,
            bits: 8,
        };
        assert!(matches!(s.layout(), Err(SchemaError::BadEncoding { .. })));
        let mut s = sample();
        s.components[1].name = "transform".into();
        assert!(matches!(s.layout(), Err(SchemaError::DuplicateName(_))));
        let mut s = sample();
        s.position = Some(Position {
            fields: vec!["meta.on".into(), "transform.x".into()],
        });
        assert!(matches!(s.layout(), Err(SchemaError::BadPosition(_))));
        let mut s = sample();
        s.max_entities = 0;
        assert!(matches!(s.layout(), Err(SchemaError::BadMaxEntities(0))));
        let mut s = sample();
        s.components[0].fields[1].encoding = Encoding::Int {
            min: i64::MIN,
            max: i64::MAX,
        };
        assert!(s.layout().is_err());
        let unknown = r#"{"name":"w","components":[],"max_entities":1,"extra":1}"#;
        assert!(serde_json::from_str::<Schema>(unknown).is_err());
    }
}
