#!/usr/bin/env python3
"""Writes src/train/megatron_argument_names.cc: every argument name a Megatron-LM release defines.

moe-train refuses a Megatron-LM argument it does not support by name ("... does not support yet")
and reports anything else as unknown; this list is how it tells the two apart. The names are read
from megatron/training/arguments.py with the ast module (nothing of Megatron-LM is imported or
run):

  * every  <group>.add_argument('--name', ...)  call, all of its option strings;
  * every  ArgumentGroupFactory(SomeConfig, exclude=[...])  call (Megatron-LM >= core_v0.16):
    one argument per dataclass field of SomeConfig and its base classes, named as
    megatron/training/argument_utils.py names them: '--field-name'; for a bool field whose
    default is not False, '--no-field-name' and '--disable-field-name'; a field's
    metadata={"argparse_meta": {"arg_names": [...]}} replaces the names; fields with init=False
    and excluded fields make none. The dataclasses are found in the same Megatron-LM checkout.

Usage (from the repository root, with a Megatron-LM checkout of the release):
  python3 scripts/megatron_argument_names.py MEGATRON/megatron/training/arguments.py \\
      --release core_v0.19.0 --commit <sha> -o src/train/megatron_argument_names.cc
"""

import argparse
import ast
import sys
from pathlib import Path


class ExtractionError(Exception):
    pass


def literal(node, what):
    try:
        return ast.literal_eval(node)
    except ValueError as error:
        raise ExtractionError(f"{what}: not a literal: {ast.unparse(node)}") from error


def add_argument_names(tree):
    """The option strings of every .add_argument(...) call."""
    names = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        if not node.args:
            raise ExtractionError(f"line {node.lineno}: add_argument without option strings")
        for arg in node.args:
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                raise ExtractionError(
                    f"line {node.lineno}: option string is not a literal: {ast.unparse(arg)}")
            if arg.value.startswith("--"):
                names.add(arg.value)
    return names


def enclosing_scopes(tree):
    """Maps every node to the innermost function definition (or the module) that contains it."""
    owner = {}

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            owner[child] = scope
            is_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(child, child if is_function else scope)

    visit(tree, tree)
    return owner


def resolve_exclude(node, scope, lineno):
    """The exclude list of a factory call: a literal, or a name bound once to a literal list."""
    if isinstance(node, ast.Name):
        bindings = [statement for statement in ast.walk(scope)
                    if isinstance(statement, (ast.Assign, ast.AugAssign, ast.AnnAssign))
                    and any(isinstance(target, ast.Name) and target.id == node.id
                            for target in (statement.targets if isinstance(statement, ast.Assign)
                                           else [statement.target]))]
        if len(bindings) != 1 or not isinstance(bindings[0], ast.Assign):
            raise ExtractionError(
                f"line {lineno}: exclude list '{node.id}' is not bound exactly once")
        node = bindings[0].value
    return set(literal(node, f"line {lineno}: exclude"))


def factory_calls(tree):
    """(dataclass name, excluded field names) of every ArgumentGroupFactory(...) call."""
    owner = enclosing_scopes(tree)
    calls = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "ArgumentGroupFactory"):
            continue
        if not node.args or not isinstance(node.args[0], ast.Name):
            raise ExtractionError(f"line {node.lineno}: the dataclass is not a plain name")
        exclude_node = node.args[1] if len(node.args) > 1 else next(
            (keyword.value for keyword in node.keywords if keyword.arg == "exclude"), None)
        excluded = set()
        if exclude_node is not None and not (isinstance(exclude_node, ast.Constant)
                                             and exclude_node.value is None):
            excluded = resolve_exclude(exclude_node, owner[node], node.lineno)
        calls.append((node.args[0].id, excluded))
    return calls


def class_index(package_root):
    """Every top-level class definition of the package: name -> [(path, ClassDef)]."""
    index = {}
    for path in sorted(package_root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError:
            continue  # templates and the like; a dataclass we need would fail below
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                index.setdefault(node.name, []).append((path, node))
    return index


def find_class(index, name):
    definitions = index.get(name, [])
    dataclasses = [(path, node) for path, node in definitions
                   if any("dataclass" in ast.unparse(decorator)
                          for decorator in node.decorator_list)]
    if len(dataclasses) != 1:
        where = ", ".join(str(path) for path, _ in definitions) or "nowhere"
        raise ExtractionError(f"dataclass {name}: {len(dataclasses)} definitions ({where})")
    return dataclasses[0][1]


def base_name(node):
    """The last component of an annotation or base-class name: typing.Optional -> Optional."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def is_none(node):
    return isinstance(node, ast.Constant) and node.value is None


def argparse_type(annotation):
    """The type argument_utils' _extract_type infers (a name), or None where it cannot."""
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        return argparse_type(ast.parse(annotation.value, mode="eval").body)
    if isinstance(annotation, (ast.Name, ast.Attribute)):
        return base_name(annotation)
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return argparse_type(annotation.left) if is_none(annotation.right) else None
    if isinstance(annotation, ast.Subscript):
        origin = base_name(annotation.value)
        arguments = (annotation.slice.elts if isinstance(annotation.slice, ast.Tuple)
                     else [annotation.slice])
        if origin == "Optional":
            return argparse_type(arguments[0])
        if origin == "Union":
            return argparse_type(arguments[0]) if len(arguments) == 2 and is_none(
                arguments[1]) else None
        if origin in ("list", "List") and len(arguments) == 1:
            return argparse_type(arguments[0])
        if origin == "Literal":
            return type(literal(arguments[0], "Literal choice")).__name__
    return None


def dataclass_fields(index, name):
    """name -> (annotation, value) of a dataclass's fields, base classes first, as fields() sees
    them (a redefinition in a subclass replaces the base's)."""
    node = find_class(index, name)
    fields = {}
    for base in node.bases:
        base_id = base_name(base)
        if base_id in index:
            fields.update(dataclass_fields(index, base_id))
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        if base_name(statement.annotation.value if isinstance(statement.annotation, ast.Subscript)
                     else statement.annotation) in ("ClassVar", "InitVar"):
            continue
        fields[statement.target.id] = (statement.annotation, statement.value)
    return fields


def field_keywords(value):
    """The keywords of a dataclasses.field(...) default, or {} for a plain default."""
    if isinstance(value, ast.Call) and base_name(value.func) == "field":
        return {keyword.arg: keyword.value for keyword in value.keywords}
    return {}


def dict_entry(node, key, what):
    """The value node under `key` of a dict display (other values may be any expression), or None
    when there is no dict or no such key."""
    if node is None:
        return None
    if not isinstance(node, ast.Dict):
        raise ExtractionError(f"{what}: not a dict display: {ast.unparse(node)}")
    for key_node, value in zip(node.keys, node.values):
        if key_node is None:
            raise ExtractionError(f"{what}: ** unpacking: {ast.unparse(node)}")
        if literal(key_node, what) == key:
            return value
    return None


def dash(name):
    return "--" + name.replace("_", "-")


def factory_names(index, class_name, excluded):
    names = set()
    for field_name, (annotation, value) in dataclass_fields(index, class_name).items():
        keywords = field_keywords(value)
        if field_name in excluded or ("init" in keywords
                                      and literal(keywords["init"], field_name) is False):
            continue
        what = f"{class_name}.{field_name}"
        argparse_meta = dict_entry(keywords.get("metadata"), "argparse_meta", f"{what} metadata")
        arg_names = dict_entry(argparse_meta, "arg_names", f"{what} argparse_meta")
        if arg_names is not None:
            names.update(name for name in literal(arg_names, f"{what} arg_names")
                         if name.startswith("--"))
            continue
        if argparse_type(annotation) == "bool":
            default_node = keywords.get("default") if keywords else value
            default = None if default_node is None else literal(default_node, f"{what} default")
            if default == False:  # noqa: E712 -- argument_utils compares with ==
                names.add(dash(field_name))
            else:
                names.update((dash("no_" + field_name), dash("disable_" + field_name)))
        else:
            names.add(dash(field_name))
    return names


def extract(arguments_py):
    tree = ast.parse(arguments_py.read_text(encoding="utf-8"), filename=str(arguments_py))
    names = add_argument_names(tree)
    calls = factory_calls(tree)
    if calls:
        index = class_index(arguments_py.resolve().parents[1])  # the megatron package
        for class_name, excluded in calls:
            names |= factory_names(index, class_name, excluded)
    return sorted(names)


def render(names, release, commit):
    source = release + (f" (commit {commit})" if commit else "")
    lines = [
        "// GENERATED by scripts/megatron_argument_names.py from megatron/training/arguments.py of",
        f"// Megatron-LM {source};",
        "// do not edit, rerun the script.",
        f"// The {len(names)} argument names that release defines, so moe-train can tell a",
        "// Megatron-LM argument it does not support yet from a typo.",
        "#include <string>",
        "#include <vector>",
        "",
        "#include \"moe/train/arguments.h\"",
        "",
        "namespace moe::train {",
        "",
        "const std::vector<std::string>& megatron_argument_names() {",
        "  static const std::vector<std::string> names = {",
    ]
    lines += [f"      \"{name}\"," for name in names]
    lines += ["  };", "  return names;", "}", "", "}  // namespace moe::train", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arguments_py", type=Path,
                        help="megatron/training/arguments.py of a Megatron-LM checkout")
    parser.add_argument("--release", required=True, help="the release tag, e.g. core_v0.19.0")
    parser.add_argument("--commit", default="", help="the commit the tag points at")
    parser.add_argument("-o", "--output", type=Path, help="the .cc to write (default stdout)")
    args = parser.parse_args()
    try:
        names = extract(args.arguments_py)
    except ExtractionError as error:
        sys.exit(f"megatron_argument_names.py: {args.arguments_py}: {error}")
    text = render(names, args.release, args.commit)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    print(f"{len(names)} argument names from {args.release}", file=sys.stderr)


if __name__ == "__main__":
    main()
