//! ONNX export: the network as a standard ONNX graph (opset 13) — Conv, the conv activation,
//! AveragePool or MaxPool, Flatten, Gemm, φ, Gemm, and a Softmax output beside the logits — with the
//! weights as initializers, so that any ONNX runtime gives the same logits as this crate.
//!
//! The few protobuf messages needed are declared here with `prost` (field numbers from
//! `onnx.proto`), so no code generator or `protoc` is needed.

use crate::checkpoint::Model;
use crate::config::{Activation, Pooling};
use crate::error::Result;
use crate::fsutil::atomic_write;
use prost::Message;
use std::path::Path;

/// `onnx.ModelProto` (the fields used).
#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
}

/// `onnx.OperatorSetIdProto`.
#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

/// `onnx.GraphProto` (the fields used).
#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

/// `onnx.NodeProto`.
#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
}

/// `onnx.AttributeProto` (INT and INTS attributes).
#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(int64, tag = "3")]
    pub i: i64,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    /// `AttributeType`: 2 = INT, 7 = INTS.
    #[prost(int32, tag = "20")]
    pub r#type: i32,
}

/// `onnx.TensorProto` (float tensors as raw little-endian bytes).
#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    /// 1 = FLOAT.
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
}

/// `onnx.ValueInfoProto`.
#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

/// `onnx.TypeProto` (tensor types only).
#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TensorTypeProto>,
}

/// `onnx.TypeProto.Tensor`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorTypeProto {
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

/// `onnx.TensorShapeProto`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

/// `onnx.TensorShapeProto.Dimension`: a size, or a name for a free size.
#[derive(Clone, PartialEq, Message)]
pub struct Dimension {
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

const FLOAT: i32 = 1;

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: 0,
        ints: v.to_vec(),
        r#type: 7,
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: v,
        ints: vec![],
        r#type: 2,
    }
}

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: output.into(),
        op_type: op.into(),
        attribute,
    }
}

fn value(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| match d {
            Some(v) => Dimension {
                dim_value: Some(*v),
                dim_param: None,
            },
            None => Dimension {
                dim_value: None,
                dim_param: Some("batch".into()),
            },
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: FLOAT,
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
    }
}

fn act_op(a: Activation) -> &'static str {
    match a {
        Activation::Relu => "Relu",
        Activation::Sigmoid => "Sigmoid",
        Activation::Tanh => "Tanh",
    }
}

/// The model as an ONNX `ModelProto`. Input `input` is `[batch, 1, img, img]` (pixels in [0, 1]);
/// outputs are `logits` and `probabilities`, `[batch, classes]`.
pub fn to_onnx(model: &Model) -> ModelProto {
    let cfg = &model.cfg;
    let init: Vec<TensorProto> = model
        .params
        .tensors()
        .into_iter()
        .map(|(name, t)| TensorProto {
            dims: crate::params::tensor_shape(cfg, name)
                .expect("known tensor")
                .iter()
                .map(|&d| d as i64)
                .collect(),
            data_type: FLOAT,
            name: name.into(),
            raw_data: t.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
        .collect();
    let with_bias = |w: &'static str, b: &'static str| if cfg.bias { vec![w, b] } else { vec![w] };
    let (ks, ps) = (cfg.ksize as i64, cfg.pool as i64);
    let mut conv_in = vec!["input"];
    conv_in.extend(with_bias("conv.weight", "conv.bias"));
    let mut fc1_in = vec!["flat"];
    fc1_in.extend(with_bias("fc1.weight", "fc1.bias"));
    let mut fc2_in = vec!["hidden"];
    fc2_in.extend(with_bias("fc2.weight", "fc2.bias"));
    let pool_op = match cfg.pooling {
        Pooling::Mean => "AveragePool",
        Pooling::Max => "MaxPool",
    };
    let nodes = vec![
        node(
            "Conv",
            &conv_in,
            "conv",
            vec![
                ints("kernel_shape", &[ks, ks]),
                ints("strides", &[1, 1]),
                ints("pads", &[0, 0, 0, 0]),
            ],
        ),
        node(act_op(cfg.conv_act), &["conv"], "y3", vec![]),
        node(
            pool_op,
            &["y3"],
            "y2",
            vec![ints("kernel_shape", &[ps, ps]), ints("strides", &[ps, ps])],
        ),
        node("Flatten", &["y2"], "flat", vec![int("axis", 1)]),
        node("Gemm", &fc1_in, "v1", vec![int("transB", 1)]),
        node(act_op(cfg.act), &["v1"], "hidden", vec![]),
        node("Gemm", &fc2_in, "logits", vec![int("transB", 1)]),
        node(
            "Softmax",
            &["logits"],
            "probabilities",
            vec![int("axis", 1)],
        ),
    ];
    let (img, c) = (cfg.img as i64, cfg.classes as i64);
    ModelProto {
        ir_version: 7,
        producer_name: "mnistconv".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(GraphProto {
            node: nodes,
            name: "architecture1".into(),
            initializer: init,
            input: vec![value("input", &[None, Some(1), Some(img), Some(img)])],
            output: vec![
                value("logits", &[None, Some(c)]),
                value("probabilities", &[None, Some(c)]),
            ],
        }),
    }
}

/// Writes the model as an `.onnx` file, atomically.
pub fn export(model: &Model, path: &Path) -> Result<()> {
    atomic_write(path, &to_onnx(model).encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Init, NetConfig, Params};

    #[test]
    fn graph_round_trips_and_holds_every_weight() {
        for bias in [false, true] {
            let cfg = NetConfig {
                bias,
                ..NetConfig::default()
            };
            let model = Model {
                cfg,
                params: Params::init(&cfg, Init::He, 1),
                meta: Default::default(),
            };
            let bytes = to_onnx(&model).encode_to_vec();
            let back = ModelProto::decode(&bytes[..]).unwrap();
            let g = back.graph.unwrap();
            let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
            assert_eq!(
                ops,
                [
                    "Conv",
                    "Relu",
                    "AveragePool",
                    "Flatten",
                    "Gemm",
                    "Relu",
                    "Gemm",
                    "Softmax"
                ]
            );
            assert_eq!(g.initializer.len(), if bias { 6 } else { 3 });
            let w1 = g
                .initializer
                .iter()
                .find(|t| t.name == "fc1.weight")
                .unwrap();
            assert_eq!(w1.dims, [100, 2000]);
            assert_eq!(w1.raw_data.len(), 4 * 200_000);
            assert_eq!(
                f32::from_le_bytes(w1.raw_data[..4].try_into().unwrap()),
                model.params.w_m1[0]
            );
        }
    }
}
