"""The rules parser: every error it can give, pinned whole, and the good paths.

Messages are part of the contract: ``file:line:col: context: message``, naming what was
found and what was expected. Cases are YAML text (parsed with the file name
``rules.yaml``) or dicts given from Python (no positions: ``<rules>``). No torch here.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from remap.errors import RulesError
from remap.rules.parse import (
    Expect,
    Freeze,
    Output,
    Rules,
    ShapePolicy,
    SourceSpec,
    TargetSpec,
    load_rules,
    parse_rules,
)
from remap.rules.steps import STEPS


def _yaml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def _error(rules: object, **kwargs: object) -> RulesError:
    with pytest.raises(RulesError) as info:
        parse_rules(rules, **kwargs)  # type: ignore[arg-type]
    assert info.value.exit_code == 2
    return info.value


STEP_NAMES = "strip_prefix, add_prefix, rename, drop, keep, transpose, reshape, slice, pad, cast, adapt, merge, split, permute_heads, lora, dequant_blocks"
TOP = "version, source, sources, target, rules, shapes, expect, freeze, output, verify, vars"

# (YAML text, the whole message). Columns are 1-based and point at the offending key
# (unknown fields, bad rename patterns) or value (everything else).
YAML_ERRORS = [
    # ------------------------------------------------------------------ the document
    pytest.param("", "rules.yaml: the rules file is empty; expected a mapping with at least `version: 1`", id="empty"),
    pytest.param("# only a comment\n", "rules.yaml: the rules file is empty; expected a mapping with at least `version: 1`", id="only-comment"),
    pytest.param("- a\n", "rules.yaml:1:1: expected a mapping with `version: 1` at the top, found a list ['a']", id="top-list"),
    pytest.param("42\n", "rules.yaml:1:1: expected a mapping with `version: 1` at the top, found an integer 42", id="top-int"),
    pytest.param(
        "rules.yaml\n",
        "rules.yaml:1:1: expected a mapping with `version: 1` at the top, found a string 'rules.yaml' "
        "(a path? read a rules file with load_rules)",
        id="top-path-like-string",
    ),
    pytest.param("rules: []\n", "rules.yaml:1:1: missing required field 'version' (write `version: 1` at the top)", id="no-version"),
    pytest.param(
        "version: 2\n",
        "rules.yaml:1:10: version: expected 1, found an integer 2 (this remap reads version 1 of the rules language)",
        id="version-2",
    ),
    pytest.param('version: "1"\n', "rules.yaml:1:10: version: expected 1, found a string '1' (write it without quotes)", id="version-quoted"),
    pytest.param("version: 1.0\n", "rules.yaml:1:10: version: expected 1, found a number 1.0", id="version-float"),
    pytest.param("version: true\n", "rules.yaml:1:10: version: expected 1, found a boolean True", id="version-bool"),
    pytest.param(
        "version: 1\nexpcet: {}\n",
        f"rules.yaml:2:1: unknown field 'expcet' (did you mean 'expect'?); expected one of: {TOP}",
        id="top-unknown-did-you-mean",
    ),
    pytest.param(
        "version: 1\nrules: []\n\n  # indented comment\nzzz: 1\n",
        f"rules.yaml:5:1: unknown field 'zzz'; expected one of: {TOP}",
        id="top-unknown-no-suggestion",
    ),
    pytest.param("version: 1\n1: x\n", f"rules.yaml:2:1: unknown field 1; expected one of: {TOP}", id="top-int-key"),
    # ------------------------------------------------------------------ unknown fields in sections
    pytest.param(
        "version: 1\nsource: {pth: x}\n",
        "rules.yaml:2:10: source: unknown field 'pth' (did you mean 'path'?); expected one of: path, key, trust_pickle, trust_links, model, args, kwargs, optimizer",
        id="source-unknown",
    ),
    pytest.param(
        "version: 1\ntarget:\n  model: m:f\n  kwrags: {}\n",
        "rules.yaml:4:3: target: unknown field 'kwrags' (did you mean 'kwargs'?); expected one of: model, args, kwargs, device, dtype, keep_fp32, shard",
        id="target-unknown",
    ),
    pytest.param(
        "version: 1\nexpect: {mising: x}\n",
        "rules.yaml:2:10: expect: unknown field 'mising' (did you mean 'missing'?); expected one of: missing, unused, min_loaded",
        id="expect-unknown",
    ),
    pytest.param(
        "version: 1\nfreeze: {parms: x}\n",
        "rules.yaml:2:10: freeze: unknown field 'parms' (did you mean 'params'?); expected one of: params, except, batchnorm, from_source",
        id="freeze-unknown",
    ),
    pytest.param(
        "version: 1\noutput: {reprt: x}\n",
        "rules.yaml:2:10: output: unknown field 'reprt' (did you mean 'report'?); expected one of: report, save, max_shard_size",
        id="output-unknown",
    ),
    pytest.param(
        "version: 1\nshapes: {skipp: x}\n",
        "rules.yaml:2:10: shapes: unknown field 'skipp' (did you mean 'skip'?); expected one of: default, skip",
        id="shapes-unknown",
    ),
    # ------------------------------------------------------------------ wrong types
    pytest.param("version: 1\nrules: {drop: x}\n", "rules.yaml:2:8: rules: expected a list, found a mapping {'drop': 'x'}", id="rules-mapping"),
    pytest.param("version: 1\nrules:\n", "rules.yaml:2:7: rules: expected a list, found nothing (null)", id="rules-null"),
    pytest.param("version: 1\nsource: [a]\n", "rules.yaml:2:9: source: expected a mapping, found a list ['a']", id="source-list"),
    pytest.param("version: 1\nexpect:\n", "rules.yaml:2:8: expect: expected a mapping, found nothing (null)", id="expect-null"),
    pytest.param(
        "version: 1\nexpect: {missing: {a: 1}}\n",
        "rules.yaml:2:19: expect: field 'missing': expected a string or a list, found a mapping {'a': 1}",
        id="expect-missing-mapping",
    ),
    pytest.param(
        "version: 1\nexpect: {unused: [a, 3]}\n",
        "rules.yaml:2:22: expect: field 'unused': item 2: expected a string, found an integer 3",
        id="expect-unused-item-int",
    ),
    pytest.param(
        'version: 1\nsource: {trust_pickle: "yes"}\n',
        "rules.yaml:2:24: source: field 'trust_pickle': expected true or false, found a string 'yes'",
        id="trust-pickle-string",
    ),
    pytest.param(
        "version: 1\nsource: {path: ''}\n",
        "rules.yaml:2:16: source: field 'path': expected a non-empty string, found a string ''",
        id="source-path-empty",
    ),
    pytest.param(
        "version: 1\nsource: {kwargs: [1]}\n",
        "rules.yaml:2:18: source: field 'kwargs': expected a mapping, found a list [1]",
        id="source-kwargs-list",
    ),
    pytest.param(
        "version: 1\ntarget: {model: m:f, args: {a: 1}}\n",
        "rules.yaml:2:28: target: field 'args': expected a list, found a mapping {'a': 1}",
        id="target-args-mapping",
    ),
    pytest.param(
        "version: 1\noutput: {save: 3}\n",
        "rules.yaml:2:16: output: field 'save': expected a string, found an integer 3",
        id="output-save-int",
    ),
    pytest.param("version: 1\ntarget: {args: [1]}\n", "rules.yaml:2:9: target: 'args' and 'kwargs' need 'model'", id="target-args-without-model"),
    # ------------------------------------------------------------------ min_loaded
    pytest.param(
        "version: 1\nexpect: {min_loaded: 1.5}\n",
        "rules.yaml:2:22: expect: field 'min_loaded': expected a number <= 1, found a number 1.5",
        id="min-loaded-above",
    ),
    pytest.param(
        "version: 1\nexpect: {min_loaded: -0.1}\n",
        "rules.yaml:2:22: expect: field 'min_loaded': expected a number >= 0, found a number -0.1",
        id="min-loaded-below",
    ),
    pytest.param(
        "version: 1\nexpect: {min_loaded: .nan}\n",
        "rules.yaml:2:22: expect: field 'min_loaded': expected a number from 0 to 1, found a number nan",
        id="min-loaded-nan",
    ),
    pytest.param(
        "version: 1\nexpect: {min_loaded: '90%'}\n",
        "rules.yaml:2:22: expect: field 'min_loaded': expected a number, found a string '90%'",
        id="min-loaded-string",
    ),
    pytest.param(
        "version: 1\nexpect: {min_loaded: true}\n",
        "rules.yaml:2:22: expect: field 'min_loaded': expected a number, found a boolean True",
        id="min-loaded-bool",
    ),
    # ------------------------------------------------------------------ shapes
    pytest.param(
        "version: 1\nshapes: skp\n",
        "rules.yaml:2:9: shapes: expected one of: error, skip; found a string 'skp' (did you mean 'skip'?)",
        id="shapes-string-typo",
    ),
    pytest.param(
        "version: 1\nshapes: ignore\n",
        "rules.yaml:2:9: shapes: expected one of: error, skip; found a string 'ignore'",
        id="shapes-string-unknown",
    ),
    pytest.param(
        "version: 1\nshapes: 3\n",
        "rules.yaml:2:9: shapes: expected one of: error, skip, or a mapping with 'default' and 'skip'; found an integer 3",
        id="shapes-int",
    ),
    pytest.param(
        "version: 1\nshapes: [skip]\n",
        "rules.yaml:2:9: shapes: expected one of: error, skip, or a mapping with 'default' and 'skip'; found a list ['skip']",
        id="shapes-list",
    ),
    pytest.param(
        "version: 1\nshapes: {default: skp}\n",
        "rules.yaml:2:19: shapes: field 'default': expected one of: error, skip; found a string 'skp' (did you mean 'skip'?)",
        id="shapes-default-typo",
    ),
    pytest.param(
        "version: 1\nshapes: {skip: 3}\n",
        "rules.yaml:2:16: shapes: field 'skip': expected a string or a list, found an integer 3",
        id="shapes-skip-int",
    ),
    # ------------------------------------------------------------------ freeze
    pytest.param(
        "version: 1\nfreeze: {batchnorm: frozn}\n",
        "rules.yaml:2:21: freeze: field 'batchnorm': expected one of: keep, eval, frozen; found a string 'frozn' (did you mean 'frozen'?)",
        id="batchnorm-typo",
    ),
    pytest.param(
        "version: 1\nfreeze: {batchnorm: true}\n",
        "rules.yaml:2:21: freeze: field 'batchnorm': expected one of: keep, eval, frozen; found a boolean True",
        id="batchnorm-bool",
    ),
    pytest.param(
        "version: 1\nfreeze: {params: true}\n",
        "rules.yaml:2:18: freeze: field 'params': expected a string or a list, found a boolean True",
        id="freeze-params-bool",
    ),
    # ------------------------------------------------------------------ bad regexes outside steps
    pytest.param(
        "version: 1\nexpect: {missing: ['(']}\n",
        "rules.yaml:2:20: expect: field 'missing': item 1: bad regex '(': missing ) at position 1",
        id="regex-expect-missing",
    ),
    pytest.param(
        "version: 1\nexpect:\n  unused: '[a'\n",
        "rules.yaml:3:11: expect: field 'unused': bad regex '[a': unterminated character set at position 2",
        id="regex-expect-unused",
    ),
    pytest.param(
        "version: 1\nfreeze: {params: '('}\n",
        "rules.yaml:2:18: freeze: field 'params': bad regex '(': missing ) at position 1",
        id="regex-freeze-params",
    ),
    pytest.param(
        "version: 1\nfreeze: {except: ['a', '(']}\n",
        "rules.yaml:2:24: freeze: field 'except': item 2: bad regex '(': missing ) at position 1",
        id="regex-freeze-except",
    ),
    pytest.param(
        "version: 1\nshapes: {skip: '('}\n",
        "rules.yaml:2:16: shapes: field 'skip': bad regex '(': missing ) at position 1",
        id="regex-shapes-skip",
    ),
    pytest.param(
        "version: 1\nshapes: {skip: ['a', '\\.x{2,1}']}\n",
        "rules.yaml:2:22: shapes: field 'skip': item 2: bad regex '\\.x{2,1}': min repeat greater than max repeat at position 4",
        id="regex-shapes-skip-item",
    ),
    # ------------------------------------------------------------------ step items
    pytest.param(
        "version: 1\nrules:\n  - a\n",
        "rules.yaml:3:5: rules: item 1: expected a mapping, found a string 'a'",
        id="step-not-mapping",
    ),
    pytest.param(
        "version: 1\nrules:\n  - optional: true\n",
        f"rules.yaml:3:5: step 1: expected exactly one step name ({STEP_NAMES}), found none",
        id="step-no-name",
    ),
    pytest.param(
        "version: 1\nrules:\n  - drop: x\n    keep: y\n",
        f"rules.yaml:3:5: step 1: expected exactly one step name ({STEP_NAMES}), found 2: drop, keep",
        id="step-two-names",
    ),
    pytest.param(
        "version: 1\nrules:\n  - drop: x\n  - renam: {a: b}\n",
        f"rules.yaml:4:5: step 2: unknown field 'renam' (did you mean 'rename'?); a step is one of: {STEP_NAMES}",
        id="step-unknown-did-you-mean",
    ),
    pytest.param(
        "version: 1\nrules:\n  - frobnicate: x\n",
        f"rules.yaml:3:5: step 1: unknown field 'frobnicate'; a step is one of: {STEP_NAMES}",
        id="step-unknown",
    ),
    pytest.param(
        "version: 1\nrules:\n  - drop: x\n    optinal: true\n",
        f"rules.yaml:4:5: step 1: unknown field 'optinal' (did you mean 'optional'?); a step is one of: {STEP_NAMES}",
        id="step-option-typo",
    ),
    pytest.param(
        'version: 1\nrules:\n  - drop: x\n    optional: "yes"\n',
        "rules.yaml:4:15: step 1 (drop): field 'optional': expected true or false, found a string 'yes'",
        id="optional-string",
    ),
    pytest.param(
        "version: 1\nrules:\n  - drop: x\n    optional: 1\n",
        "rules.yaml:4:15: step 1 (drop): field 'optional': expected true or false, found an integer 1",
        id="optional-int",
    ),
    # ------------------------------------------------------------------ step values
    pytest.param(
        "version: 1\nrules:\n  - strip_prefix: ''\n",
        "rules.yaml:3:19: step 1 (strip_prefix): expected a non-empty prefix, found ''",
        id="strip-prefix-empty",
    ),
    pytest.param(
        "version: 1\nrules:\n  - strip_prefix: []\n",
        "rules.yaml:3:19: step 1 (strip_prefix): expected a non-empty list, found a list []",
        id="strip-prefix-empty-list",
    ),
    pytest.param(
        "version: 1\nrules:\n  - strip_prefix: [a, 1]\n",
        "rules.yaml:3:23: step 1 (strip_prefix): item 2: expected a string, found an integer 1",
        id="strip-prefix-int-item",
    ),
    pytest.param(
        "version: 1\nrules:\n  - strip_prefix: {a: 1}\n",
        "rules.yaml:3:19: step 1 (strip_prefix): expected a string or a list, found a mapping {'a': 1}",
        id="strip-prefix-mapping",
    ),
    pytest.param(
        "version: 1\nrules:\n  - add_prefix: ''\n",
        "rules.yaml:3:17: step 1 (add_prefix): expected a non-empty prefix, found ''",
        id="add-prefix-empty",
    ),
    pytest.param(
        "version: 1\nrules:\n  - add_prefix: {prefix: ''}\n",
        "rules.yaml:3:26: step 1 (add_prefix): field 'prefix': expected a non-empty prefix, found ''",
        id="add-prefix-long-empty",
    ),
    pytest.param(
        "version: 1\nrules:\n  - add_prefix: {prefix: 1}\n",
        "rules.yaml:3:26: step 1 (add_prefix): field 'prefix': expected a string, found an integer 1",
        id="add-prefix-int",
    ),
    pytest.param(
        "version: 1\nrules:\n  - add_prefix: {prefx: a}\n",
        "rules.yaml:3:18: step 1 (add_prefix): unknown field 'prefx' (did you mean 'prefix'?); expected one of: prefix, match",
        id="add-prefix-unknown",
    ),
    pytest.param(
        "version: 1\nrules:\n  - add_prefix: {match: a}\n",
        "rules.yaml:3:17: step 1 (add_prefix): missing required field 'prefix'",
        id="add-prefix-no-prefix",
    ),
    pytest.param(
        "version: 1\nrules:\n  - add_prefix: [a]\n",
        "rules.yaml:3:17: step 1 (add_prefix): expected a string or a mapping, found a list ['a']",
        id="add-prefix-list",
    ),
    pytest.param(
        "version: 1\nrules:\n  - drop: []\n",
        "rules.yaml:3:11: step 1 (drop): expected a non-empty list, found a list []",
        id="drop-empty",
    ),
    pytest.param(
        "version: 1\nrules:\n  - keep: {a: 1}\n",
        "rules.yaml:3:11: step 1 (keep): expected a string or a list, found a mapping {'a': 1}",
        id="keep-mapping",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: 'a'\n",
        "rules.yaml:3:13: step 1 (rename): expected a mapping, found a string 'a'",
        id="rename-string",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {}\n",
        "rules.yaml:3:13: step 1 (rename): expected a non-empty mapping, found a mapping {}",
        id="rename-empty",
    ),
    # ------------------------------------------------------------------ bad regexes in steps
    pytest.param(
        "version: 1\nrules:\n  - drop: '('\n",
        "rules.yaml:3:11: step 1 (drop): bad regex '(': missing ) at position 1",
        id="regex-drop",
    ),
    pytest.param(
        "version: 1\nrules:\n  - drop: ['a', '(']\n",
        "rules.yaml:3:17: step 1 (drop): item 2: bad regex '(': missing ) at position 1",
        id="regex-drop-item",
    ),
    pytest.param(
        "version: 1\nrules:\n  - keep: '[a'\n",
        "rules.yaml:3:11: step 1 (keep): bad regex '[a': unterminated character set at position 2",
        id="regex-keep",
    ),
    pytest.param(
        "version: 1\nrules:\n  - add_prefix: {prefix: a, match: '('}\n",
        "rules.yaml:3:36: step 1 (add_prefix): field 'match': bad regex '(': missing ) at position 1",
        id="regex-add-prefix-match",
    ),
    pytest.param(
        "version: 1\nrules:\n  - add_prefix: {prefix: a, match: [b, '(']}\n",
        "rules.yaml:3:40: step 1 (add_prefix): field 'match': item 2: bad regex '(': missing ) at position 1",
        id="regex-add-prefix-match-item",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {'a': 'b', '(': 'x'}\n",
        "rules.yaml:3:24: step 1 (rename): bad regex '(': missing ) at position 1",
        id="regex-rename-mapping",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename:\n      '^features\\.(\\d+': 'layers.\\1.'\n",
        "rules.yaml:4:7: step 1 (rename): bad regex '^features\\.(\\d+': missing ) at position 15",
        id="regex-rename-mapping-block",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: '(', to: 'x'}\n",
        "rules.yaml:3:20: step 1 (rename): field 'from': bad regex '(': missing ) at position 1",
        id="regex-rename-from",
    ),
    # ------------------------------------------------------------------ rename replacements
    pytest.param(
        "version: 1\nrules:\n  - rename: {'a(\\d)': '\\2'}\n",
        "rules.yaml:3:23: step 1 (rename): replacement '\\2' refers to group 2, but pattern 'a(\\d)' has 1 group(s)",
        id="rename-missing-group-index",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {'a(?P<n>\\d)': '\\g<m>'}\n",
        "rules.yaml:3:28: step 1 (rename): replacement '\\g<m>' refers to group 'm', but pattern 'a(?P<n>\\d)' "
        "has no such group (named groups: n)",
        id="rename-missing-group-name",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {'a': '\\g<x>'}\n",
        "rules.yaml:3:19: step 1 (rename): replacement '\\g<x>' refers to group 'x', but pattern 'a' "
        "has no such group (named groups: none)",
        id="rename-missing-group-no-names",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: 'a(\\d)', to: 'b\\2'}\n",
        "rules.yaml:3:33: step 1 (rename): field 'to': replacement 'b\\2' refers to group 2, but pattern 'a(\\d)' has 1 group(s)",
        id="rename-long-missing-group",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {'a\\.': 'b\\.'}\n",
        "rules.yaml:3:21: step 1 (rename): replacement 'b\\.' has the escape '\\.' at position 1: "
        "replacements are plain text with \\1 or \\g<name> references (write '.', not '\\.')",
        id="rename-regex-escape-in-replacement",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {'a': 'b\\'}\n",
        "rules.yaml:3:19: step 1 (rename): replacement 'b\\' ends with a lone backslash: "
        "write \\\\ for a backslash, \\1 or \\g<name> for a group",
        id="rename-lone-backslash",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {'a': 'b\\g<1'}\n",
        "rules.yaml:3:19: step 1 (rename): replacement 'b\\g<1': unterminated \\g<...> at position 1",
        id="rename-unterminated-g",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {'a': null}\n",
        "rules.yaml:3:19: step 1 (rename): pattern 'a': expected a replacement string or a mapping {to, add, map, select}, found nothing (null); to remove keys, use `drop`",
        id="rename-null",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename:\n      a: b\n      c: 1\n",
        "rules.yaml:5:10: step 1 (rename): pattern 'c': expected a replacement string or a mapping {to, add, map, select}, found an integer 1",
        id="rename-int-replacement",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {1: b}\n",
        "rules.yaml:3:14: step 1 (rename): expected a regex string as pattern, found an integer 1",
        id="rename-int-pattern",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: a, to: null}\n",
        "rules.yaml:3:27: step 1 (rename): field 'to': expected a string, found nothing (null)",
        id="rename-long-null",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: 1, to: b}\n",
        "rules.yaml:3:20: step 1 (rename): field 'from': expected a string, found an integer 1",
        id="rename-long-int-from",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: a}\n",
        "rules.yaml:3:13: step 1 (rename): missing required field 'to': the from/to form needs both 'from' and 'to'",
        id="rename-long-no-to",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {to: a}\n",
        "rules.yaml:3:13: step 1 (rename): missing required field 'from': the from/to form needs both 'from' and 'to'",
        id="rename-long-no-from",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: a, to: b, ad: {}}\n",
        "rules.yaml:3:30: step 1 (rename): unknown field 'ad' (did you mean 'add'?); the from/to form takes: from, to, add, map, select",
        id="rename-long-unknown",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: a, to: b, '^c': d}\n",
        "rules.yaml:3:30: step 1 (rename): unknown field '^c'; the from/to form takes: from, to, add, map, select",
        id="rename-long-mixed-with-mapping",
    ),
    # ------------------------------------------------------------------ rename add
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: 'a(\\d)', to: 'b\\1', add: {2: 1}}\n",
        "rules.yaml:3:45: step 1 (rename): add refers to group 2, but pattern 'a(\\d)' has 1 group(s)",
        id="add-missing-group",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: 'a(?P<i>\\d)', to: 'b\\1', add: {j: 1}}\n",
        "rules.yaml:3:50: step 1 (rename): add refers to group 'j', but pattern 'a(?P<i>\\d)' has no such group (named groups: i)",
        id="add-missing-named-group",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: 'a(\\d)', to: 'b', add: {1: 1}}\n",
        "rules.yaml:3:43: step 1 (rename): add changes group 1, which replacement 'b' does not use",
        id="add-unused-group",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: 'a(\\d)', to: 'b\\1', add: {1: x}}\n",
        "rules.yaml:3:49: step 1 (rename): field 'add': group 1: expected an integer to add, found a string 'x'",
        id="add-string",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: 'a(\\d)', to: 'b\\1', add: {1: 1.5}}\n",
        "rules.yaml:3:49: step 1 (rename): field 'add': group 1: expected an integer to add, found a number 1.5",
        id="add-float",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: 'a(\\d)', to: 'b\\1', add: {1: true}}\n",
        "rules.yaml:3:49: step 1 (rename): field 'add': group 1: expected an integer to add, found a boolean True",
        id="add-bool",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: 'a(\\d)', to: 'b\\1', add: [1]}\n",
        "rules.yaml:3:45: step 1 (rename): field 'add': expected a mapping of group -> integer, found a list [1]",
        id="add-list",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: 'a(\\d)', to: 'b\\1', add: {}}\n",
        "rules.yaml:3:45: step 1 (rename): field 'add': expected a mapping of group -> integer, found a mapping {}",
        id="add-empty",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: 'a(\\d)', to: 'b\\1', add: }\n",
        "rules.yaml:3:44: step 1 (rename): field 'add': expected a mapping of group -> integer, found nothing (null)",
        id="add-null",
    ),
    # ------------------------------------------------------------------ YAML itself
    pytest.param("version: 1\nversion: 1\n", "rules.yaml:2:1: duplicate key 'version' (first at line 1)", id="duplicate-top-key"),
    pytest.param(
        "version: 1\nrules:\n  - rename:\n      a: b\n      a: c\n",
        "rules.yaml:5:7: duplicate key 'a' (first at line 4)",
        id="duplicate-rename-pattern",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {from: a, to: b, add: {1: 1, 1: 2}}\n",
        "rules.yaml:3:42: duplicate key 1 (first at line 3)",
        id="duplicate-int-key",
    ),
    pytest.param("version: 1\nrules: [\n", "rules.yaml:3:1: invalid YAML: expected the node content, but found '<stream end>'", id="yaml-unclosed"),
    pytest.param(
        "version: 1\nrules:\n  - drop: x\n   - keep: y\n",
        "rules.yaml:4:4: invalid YAML: expected <block end>, but found '<block sequence start>'",
        id="yaml-indentation",
    ),
    pytest.param(
        "version: 1\nrules:\n\t- drop: x\n",
        "rules.yaml:3:1: invalid YAML: found character '\\t' that cannot start any token",
        id="yaml-tab",
    ),
    pytest.param(
        "version: 1\n---\nversion: 1\n",
        "rules.yaml:2:1: invalid YAML: expected a single document in the stream, but found another document",
        id="yaml-two-documents",
    ),
    pytest.param("version: 1\nx: *nowhere\n", "rules.yaml:2:4: invalid YAML: found undefined alias 'nowhere'", id="yaml-undefined-alias"),
    pytest.param(
        "version: 1\nx: !!python/object:os.system a\n",
        "rules.yaml:2:4: invalid YAML: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object:os.system'",
        id="yaml-python-tag-refused",
    ),
    pytest.param("version: 1\n<<: {a: 1}\n", "rules.yaml:2:1: YAML merge keys ('<<') are not supported; write the fields out", id="yaml-merge-key"),
    pytest.param("version: 1\n? [a]\n: 1\n", "rules.yaml:2:3: expected a string key, found a list", id="key-list"),
    pytest.param("version: 1\n? {a: 1}\n: 1\n", "rules.yaml:2:3: expected a string key, found a mapping", id="key-mapping"),
    pytest.param("version: 1\nnull: 1\n", "rules.yaml:2:1: expected a string key, found nothing (null)", id="key-null"),
    pytest.param("version: 1\n1.5: 1\n", "rules.yaml:2:1: expected a string key, found a number 1.5", id="key-float"),
    pytest.param("version: 1\ntrue: 1\n", "rules.yaml:2:1: expected a string key, found a boolean True", id="key-bool"),
    pytest.param("version: 1\nx: &a [*a]\n", "rules.yaml:2:4: recursive alias: this node contains itself", id="recursive-alias-list"),
    pytest.param("version: 1\nx: &a {b: *a}\n", "rules.yaml:2:4: recursive alias: this node contains itself", id="recursive-alias-mapping"),
]


@pytest.mark.parametrize(("text", "message"), YAML_ERRORS)
def test_yaml_error(text: str, message: str) -> None:
    assert str(_error(text, filename="rules.yaml")) == message


def test_alias_bomb_is_refused() -> None:
    """Nine aliases of nine aliases of ... expand to 9**7 nodes; the builder stops at MAX_NODES."""
    lines = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, name in zip("abcdef", "bcdefg"):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    err = _error("\n".join(lines) + "\n", filename="rules.yaml")
    # it points at the section being built when the count ran out, not at the anchor
    assert str(err) == "rules.yaml:6:1: the document expands to more than 100000 nodes (aliases?); refusing to build it"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[" * 3000 + "]" * 3000, id="flow"),
        pytest.param("a: " + "[" * 600 + "]" * 600, id="flow-under-key"),
        pytest.param("- " * 3000 + "x", id="block"),
    ],
)
def test_deep_nesting_is_refused(text: str) -> None:
    assert str(_error(text, filename="rules.yaml")) == "rules.yaml: the document is nested too deeply"


def test_positions_point_at_key_or_value() -> None:
    """A block-style file: columns land on the offending key or value, lines count from 1."""
    text = _yaml(
        """
        version: 1
        rules:
          - strip_prefix: module.
          - rename:
              '^features\\.(\\d+)\\.': 'layers.\\1.'
              '^head\\.': '\\g<2>'
        """
    )
    assert str(_error(text, filename="cfg/r.yaml")) == (
        "cfg/r.yaml:6:18: step 2 (rename): replacement '\\g<2>' refers to group 2, but pattern '^head\\.' has 0 group(s)"
    )


# --------------------------------------------------------------------------- dicts from Python

DICT_ERRORS = [
    pytest.param({}, "<rules>: missing required field 'version' (write `version: 1` at the top)", id="no-version"),
    pytest.param({"version": 2}, "<rules>: version: expected 1, found an integer 2 (this remap reads version 1 of the rules language)", id="version-2"),
    pytest.param(
        {"version": 1, "expcet": {}},
        f"<rules>: unknown field 'expcet' (did you mean 'expect'?); expected one of: {TOP}",
        id="unknown-top",
    ),
    pytest.param(
        {"version": 1, "rules": [{"drop": ("a", "(")}]},
        "<rules>: step 1 (drop): item 2: bad regex '(': missing ) at position 1",
        id="regex-in-tuple",
    ),
    pytest.param(
        {"version": 1, "rules": [{"rename": {r"^a\.(\d)": r"b\2"}}]},
        r"<rules>: step 1 (rename): replacement 'b\2' refers to group 2, but pattern '^a\.(\d)' has 1 group(s)",
        id="rename-group",
    ),
    pytest.param(
        {"version": 1, "rules": [{"rename": {"from": r"a(\d)", "to": r"b\1", "add": {1: "x"}}}]},
        "<rules>: step 1 (rename): field 'add': group 1: expected an integer to add, found a string 'x'",
        id="add-string",
    ),
    pytest.param(
        {"version": 1, "expect": {"missing": ["a", 5]}},
        "<rules>: expect: field 'missing': item 2: expected a string, found an integer 5",
        id="expect-item-int",
    ),
    pytest.param(
        {"version": 1, "rules": [{"drop": "x", "optional": "no"}]},
        "<rules>: step 1 (drop): field 'optional': expected true or false, found a string 'no'",
        id="optional",
    ),
    pytest.param(
        {"version": 1, "freeze": {"batchnorm": "Frozen"}},
        "<rules>: freeze: field 'batchnorm': expected one of: keep, eval, frozen; found a string 'Frozen' (did you mean 'frozen'?)",
        id="batchnorm",
    ),
]


@pytest.mark.parametrize(("rules", "message"), DICT_ERRORS)
def test_dict_error(rules: dict, message: str) -> None:
    assert str(_error(rules)) == message


def test_dict_error_uses_given_filename() -> None:
    assert str(_error({"version": 3}, filename="api")) == "api: version: expected 1, found an integer 3 (this remap reads version 1 of the rules language)"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param(42, "expected rules as YAML text, a dict or Rules, found an integer 42", id="int"),
        pytest.param(["version: 1"], "expected rules as YAML text, a dict or Rules, found a list ['version: 1']", id="list"),
        pytest.param(
            Path("rules.yaml"), "parse_rules takes YAML text or a dict; read the file 'rules.yaml' with load_rules(path)", id="path"
        ),
    ],
)
def test_parse_rules_wrong_type(value: object, message: str) -> None:
    assert str(_error(value)) == message


# --------------------------------------------------------------------------- files


def test_load_rules_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert str(info.value) == f"{path}: no such rules file"
    assert info.value.exit_code == 2


def test_load_rules_directory(tmp_path: Path) -> None:
    with pytest.raises(RulesError) as info:
        load_rules(tmp_path)
    assert str(info.value) == f"{tmp_path}: expected a rules file, found a directory"
    assert info.value.exit_code == 2


def test_load_rules_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(b"version: 1\n# \xff\n")
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert str(info.value) == f"{path}: cannot read the rules file: it is not utf-8 text (invalid byte at offset 13)"


def test_load_rules_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("version: 1\n\nrules:\n  - renam: {a: b}\n")
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert str(info.value) == (
        f"{path}:4:5: step 1: unknown field 'renam' (did you mean 'rename'?); a step is one of: {STEP_NAMES}"
    )


def test_load_rules_ok(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("\ufeffversion: 1\nrules:\n  - strip_prefix: module.\n")  # a BOM is fine
    rules = load_rules(path)
    assert rules.filename == str(path)
    assert rules.base_dir == str(tmp_path.resolve())
    assert [s.summary() for s in rules.steps] == ["strip_prefix 'module.'"]
    assert rules.steps[0].where == f"{path}:3:5"


# --------------------------------------------------------------------------- good paths

GOOD_STEPS = [
    pytest.param("strip_prefix: module.", "strip_prefix 'module.'", id="strip-short"),
    pytest.param("strip_prefix: [module., _orig_mod.]", "strip_prefix 'module.', '_orig_mod.'", id="strip-list"),
    pytest.param("add_prefix: backbone.", "add_prefix 'backbone.'", id="add-short"),
    pytest.param("add_prefix: {prefix: backbone.}", "add_prefix 'backbone.'", id="add-long"),
    pytest.param("add_prefix: {prefix: b., match: '^a'}", "add_prefix 'b.' on '^a'", id="add-match"),
    pytest.param("add_prefix: {prefix: b., match: ['^a', '^c\\.']}", "add_prefix 'b.' on '^a', '^c\\.'", id="add-match-list"),
    pytest.param("rename: {'^features\\.(\\d+)\\.': 'layers.\\1.'}", "rename '^features\\.(\\d+)\\.' -> 'layers.\\1.'", id="rename-mapping"),
    pytest.param(
        "rename: {'^a\\.': 'b.', '^c': 'd'}",
        "rename '^a\\.' -> 'b.'; '^c' -> 'd'",
        id="rename-mapping-two",
    ),
    pytest.param("rename: {from: '^x', to: 'y'}", "rename '^x' -> 'y'", id="rename-long"),
    pytest.param(
        "rename: {from: '^encoder\\.(\\d+)\\.', to: 'conv\\1.', add: {1: 1}}",
        "rename '^encoder\\.(\\d+)\\.' -> 'conv\\1.' add {1: 1}",
        id="rename-long-add",
    ),
    pytest.param(
        "rename: {from: '^l(?P<i>\\d+)', to: 'm\\g<i>', add: {i: -1}}",
        "rename '^l(?P<i>\\d+)' -> 'm\\g<i>' add {'i': -1}",
        id="rename-long-add-named",
    ),
    pytest.param(
        "rename: {from: 'a(\\d)', to: 'b\\1', add: {'1': 2}}",
        "rename 'a(\\d)' -> 'b\\1' add {1: 2}",
        id="rename-add-quoted-index",
    ),
    pytest.param("rename: {'x': 'a\\\\b'}", "rename 'x' -> 'a\\\\b'", id="rename-literal-backslash"),
    pytest.param("drop: '\\.num_batches_tracked$'", "drop '\\.num_batches_tracked$'", id="drop-short"),
    pytest.param("drop: ['\\.num_batches_tracked$', '^fc\\.']", "drop '\\.num_batches_tracked$', '^fc\\.'", id="drop-list"),
    pytest.param("keep: '^encoder\\.'", "keep '^encoder\\.'", id="keep-short"),
    pytest.param("keep: ['^a', '^b']", "keep '^a', '^b'", id="keep-list"),
    pytest.param("transpose: '\\.c_attn\\.weight$'", "transpose(-2, -1) on '\\.c_attn\\.weight$'", id="transpose"),
    pytest.param(
        "reshape: {match: '\\.proj\\.weight$', shape: [768, -1, 1, 1]}",
        "reshape to [768, -1, 1, 1] on '\\.proj\\.weight$'",
        id="reshape",
    ),
    pytest.param(
        "permute_heads: {match: '\\.wk\\.weight$', heads: 8, to: half_split}",
        "permute_heads to half_split, heads 8 on '\\.wk\\.weight$'",
        id="permute-heads",
    ),
    pytest.param("lora: {match: '\\.q_proj\\.weight$', alpha: 16, rank: 8}", "lora merge (alpha 16, rank 8) on '\\.q_proj\\.weight$'", id="lora"),
    pytest.param(
        "dequant_blocks: {match: '\\.weight$', dtype: bfloat16}",
        "dequant_blocks '\\.weight$' with scale '\\g<0>_scale_inv' (block 128x128, to bfloat16)",
        id="dequant-blocks",
    ),
    pytest.param(
        "slice: {match: '^fc\\.(weight|bias)$', dim: 0, index: [0, 5, 9]}",
        "slice dim 0 [index=[0, 5, 9]] on '^fc\\.(weight|bias)$'",
        id="slice",
    ),
    pytest.param("pad: {match: '^wte\\.weight$', fill: mean}", "pad to the target shape with mean on '^wte\\.weight$'", id="pad"),
    pytest.param("cast: {match: '.*', dtype: float16}", "cast to float16 on '.*'", id="cast"),
    pytest.param(
        "merge: {match: '^(.*)\\.(q|k|v)_proj\\.weight$', into: '\\1.in_proj_weight', order: [q, k, v], dim: 0}",
        "merge '^(.*)\\.(q|k|v)_proj\\.weight$' into '\\1.in_proj_weight' (cat dim 0, order q, k, v)",
        id="merge",
    ),
    pytest.param(
        "split: {match: '^(.*)\\.qkv\\.weight$', into: ['\\1.q.weight', '\\1.k.weight', '\\1.v.weight'], dim: 0}",
        "split '^(.*)\\.qkv\\.weight$' into '\\1.q.weight', '\\1.k.weight', '\\1.v.weight' (dim 0, 3 equal parts)",
        id="split",
    ),
    pytest.param("adapt: {match: '^conv1\\.weight$', op: in_channels}", "adapt in_channels on '^conv1\\.weight$'", id="adapt"),
]


@pytest.mark.parametrize(("step", "summary"), GOOD_STEPS)
def test_step_summary(step: str, summary: str) -> None:
    rules = parse_rules(f"version: 1\nrules:\n  - {step}\n", filename="rules.yaml")
    (parsed,) = rules.steps
    assert parsed.summary() == summary
    assert parsed.index == 1
    assert parsed.kind == step.split(":")[0]
    assert parsed.label == f"step 1 ({parsed.kind})"
    assert parsed.optional is False
    assert parsed.where == "rules.yaml:3:5"


def test_every_registered_step_is_covered() -> None:
    covered = {p.values[0].split(":")[0] for p in GOOD_STEPS}
    assert covered == set(STEPS)


def test_steps_index_optional_and_where() -> None:
    text = _yaml(
        """
        version: 1
        rules:
          - strip_prefix: module.
            optional: true
          - optional: false
            drop: x
          -   keep: y
        """
    )
    rules = parse_rules(text, filename="rules.yaml")
    assert [(s.index, s.kind, s.optional, s.where) for s in rules.steps] == [
        (1, "strip_prefix", True, "rules.yaml:3:5"),
        (2, "drop", False, "rules.yaml:6:5"),
        (3, "keep", False, "rules.yaml:7:7"),
    ]


def test_dict_steps_have_no_position() -> None:
    rules = parse_rules({"version": 1, "rules": [{"drop": "x"}]})
    assert rules.steps[0].where is None


def test_short_and_long_forms_agree() -> None:
    short = parse_rules({"version": 1, "rules": [{"add_prefix": "b."}, {"rename": {"^a": "c"}}, {"drop": "x"}]})
    long = parse_rules({"version": 1, "rules": [{"add_prefix": {"prefix": "b."}}, {"rename": {"from": "^a", "to": "c"}}, {"drop": ["x"]}]})
    assert short.steps == long.steps


def test_defaults() -> None:
    rules = parse_rules("version: 1\n", filename="rules.yaml")
    assert rules == Rules(filename="rules.yaml")
    assert rules.version == 1
    assert rules.source == SourceSpec(path=None, key=None, trust_pickle=False, model=None, args=(), kwargs={})
    assert rules.target == TargetSpec(model=None, args=(), kwargs={})
    assert rules.steps == ()
    assert rules.shapes == ShapePolicy(default="error", skip_patterns=())
    assert rules.expect == Expect(missing=(), unused=(), min_loaded=None)
    assert rules.freeze == Freeze(params=(), except_=(), batchnorm="keep")
    assert rules.freeze.active is False
    assert rules.output == Output(report=None, save=None)
    assert rules.base_dir is None


def test_defaults_of_empty_sections() -> None:
    rules = parse_rules({"version": 1, "source": {}, "target": {}, "rules": [], "expect": {}, "freeze": {}, "output": {}})
    assert rules == Rules()


def test_every_section_filled() -> None:
    text = _yaml(
        """
        version: 1
        source: {path: ckpt/r.pth, key: state_dict, trust_pickle: true}
        target: {model: 'torchvision.models:resnet50', args: [1], kwargs: {num_classes: 10}}
        rules:
          - drop: '^fc\\.'
        shapes: {default: error, skip: ['^head\\.', '^cls']}
        expect: {missing: '^fc\\.', unused: [a, b], min_loaded: 0.99}
        freeze: {params: '.*', except: ['^fc\\.'], batchnorm: frozen}
        output: {report: out/report.json, save: out/model.safetensors}
        """
    )
    rules = parse_rules(text, filename="rules.yaml", base_dir="/x")
    assert rules.source == SourceSpec("ckpt/r.pth", "state_dict", True, None, (), {})
    assert rules.target == TargetSpec("torchvision.models:resnet50", (1,), {"num_classes": 10})
    assert rules.shapes == ShapePolicy("error", ("^head\\.", "^cls"))
    assert rules.expect == Expect(("^fc\\.",), ("a", "b"), 0.99)
    assert rules.freeze == Freeze((".*",), ("^fc\\.",), "frozen")
    assert rules.freeze.active
    assert rules.output == Output("out/report.json", "out/model.safetensors")
    assert (rules.filename, rules.base_dir) == ("rules.yaml", "/x")


def test_source_model_factory() -> None:
    rules = parse_rules({"version": 1, "source": {"model": "timm.models:vit", "kwargs": {"pretrained": False}}})
    assert rules.source == SourceSpec(model="timm.models:vit", kwargs={"pretrained": False})


@pytest.mark.parametrize(
    ("shapes", "policy"),
    [
        pytest.param("error", ShapePolicy("error"), id="error"),
        pytest.param("skip", ShapePolicy("skip"), id="skip"),
        pytest.param({"skip": "^fc"}, ShapePolicy("error", ("^fc",)), id="skip-one"),
        pytest.param({"default": "skip"}, ShapePolicy("skip"), id="default-skip"),
        pytest.param({}, ShapePolicy("error"), id="empty-mapping"),
    ],
)
def test_shapes_forms(shapes: object, policy: ShapePolicy) -> None:
    assert parse_rules({"version": 1, "shapes": shapes}).shapes == policy


@pytest.mark.parametrize(
    ("policy", "key", "skips"),
    [
        (ShapePolicy("skip"), "anything", True),
        (ShapePolicy("error"), "anything", False),
        (ShapePolicy("error", ("^fc\\.",)), "fc.weight", True),
        (ShapePolicy("error", ("^fc\\.",)), "head.fc.weight", False),
    ],
)
def test_shape_policy_skips(policy: ShapePolicy, key: str, skips: bool) -> None:
    assert policy.skips(key) is skips


@pytest.mark.parametrize(("mode", "active"), [("keep", False), ("eval", True), ("frozen", True)])
def test_freeze_batchnorm_modes(mode: str, active: bool) -> None:
    freeze = parse_rules({"version": 1, "freeze": {"batchnorm": mode}}).freeze
    assert (freeze.batchnorm, freeze.active) == (mode, active)


@pytest.mark.parametrize("value", [0, 0.5, 1, 1.0])
def test_min_loaded_bounds_accepted(value: float) -> None:
    assert parse_rules({"version": 1, "expect": {"min_loaded": value}}).expect.min_loaded == value


def test_parse_cache_returns_same_object() -> None:
    text = "version: 1\nrules:\n  - drop: cache-test\n"
    first = parse_rules(text, filename="rules.yaml")
    assert parse_rules(text, filename="rules.yaml") is first
    assert parse_rules(text, filename="other.yaml") is not first  # positions name the file
    assert parse_rules(first) is first  # Rules pass through


def test_errors_are_not_cached() -> None:
    for _ in range(2):
        assert str(_error("version: 2\n", filename="rules.yaml")).startswith("rules.yaml:1:10: version:")


def test_dict_with_tuples_equals_dict_with_lists() -> None:
    a = parse_rules({"version": 1, "rules": [{"strip_prefix": ("module.", "_orig_mod.")}], "expect": {"missing": ("x",)}})
    b = parse_rules({"version": 1, "rules": [{"strip_prefix": ["module.", "_orig_mod."]}], "expect": {"missing": ["x"]}})
    assert a == b


def test_yaml_and_dict_give_equal_rules() -> None:
    text = "version: 1\nrules:\n  - rename: {'^a(\\d)': 'b\\1'}\nexpect: {missing: x}\n"
    from_yaml = parse_rules(text)
    from_dict = parse_rules({"version": 1, "rules": [{"rename": {r"^a(\d)": r"b\1"}}], "expect": {"missing": "x"}})
    assert [s.summary() for s in from_yaml.steps] == [s.summary() for s in from_dict.steps]
    assert from_yaml.expect == from_dict.expect


def test_yaml_anchor_reused() -> None:
    """Plain anchors and aliases (not merge keys) are fine."""
    text = "version: 1\nexpect: {missing: &heads ['^fc\\.', '^cls']}\nfreeze: {params: '.*', except: *heads}\n"
    rules = parse_rules(text)
    assert rules.expect.missing == rules.freeze.except_ == ("^fc\\.", "^cls")


def test_found_string_keeps_backslashes_single() -> None:
    err = _error("version: 1\nrules:\n  - rename: 'a\\.b'\n", filename="rules.yaml")
    assert str(err) == "rules.yaml:3:13: step 1 (rename): expected a mapping, found a string 'a\\.b'"


def test_source_path_and_model_together_name_weights_and_architecture() -> None:
    rules = parse_rules("version: 1\nsource: {path: a.pt, model: 'm:f'}\n", filename="rules.yaml")
    assert (rules.source.path, rules.source.model) == ("a.pt", "m:f")  # model builds the architecture for verify
