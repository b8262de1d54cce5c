"""ember's graph IR: types, hash-consed nodes, graphs, the op table, builder, text format,
verifier and NumPy reference interpreter. Importing it needs only NumPy.
"""
import ember.ir.dtypes as dtypes
from ember.errors import IRError, ParseError, ShapeError, VerifyError
from ember.ir.types import TensorType, tensor_type
from ember.ir.node import Node
from ember.ir.graph import Graph
from ember.ir.builder import GraphBuilder, make_node
from ember.ir.printer import print_ir
from ember.ir.parser import parse_ir
from ember.ir.verifier import verify
from ember.ir.interpreter import run_reference

__all__ = ["dtypes", "IRError", "ParseError", "ShapeError", "VerifyError", "TensorType",
           "tensor_type", "Node", "Graph", "GraphBuilder", "make_node", "print_ir", "parse_ir",
           "verify", "run_reference"]
