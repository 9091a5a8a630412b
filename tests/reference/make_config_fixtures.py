#!/usr/bin/env python3
"""Expected bytes for diffuse_config_save (test-config).

diffusers writes configs (and save_pretrained's index) with
json.dumps(obj, indent=2, sort_keys=True) + "\\n".  This writes, under
tests/fixtures/config/:

  pyjson.json     a dict with the values that stress that format (float
                  repr: shortest round-trip digits, exponent switch at 1e16 /
                  1e-4; ensure_ascii escapes incl. surrogate pairs and DEL;
                  nested/empty containers; key order) as json.dumps writes it.
                  Loading it and saving it again must give the same bytes.
  special.json    {"text": json.dumps({"a": inf, "b": -inf, "c": nan, ...})}:
                  values json-glib cannot parse back, built in C by the test.

Run:  python3 tests/reference/make_config_fixtures.py
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "config")


def dumps(o):
    return json.dumps(o, indent=2, sort_keys=True) + "\n"


def main():
    os.makedirs(OUT, exist_ok=True)
    floats = [0.1, 1e-05, 1e-4, 0.00012, 1e16, 1e15, 9999999999999998.0, 123456789012345680.0, 5e-324,
              1.7976931348623157e308, -0.0, 0.0, 2.5, 1 / 3, 100.0, 1e22, 1.5e-7, 0.00085, 0.012, 3.14159,
              -1234.5678, 2.0 ** -1074 * 3, 1e-10, 12345678.9, 0.5, 4.35, 2.675, 1e100, -1e-100, 0.30000000000000004]
    obj = {
        "_class_name": "UNet2DConditionModel",
        "zeta": 1,
        "Alpha": 2,
        "alpha": 3,
        "floats": floats,
        "ints": [0, -1, 2 ** 53 + 1, -(2 ** 62), 9223372036854775807],
        "bools": [True, False],
        "none": None,
        "empty_list": [],
        "empty_obj": {},
        "nested": {"b": [1, [2, [3, {}]], {"x": None}], "a": {"deep": {"deeper": [1.0]}}},
        "strings": ["plain", "quote\" backslash\\ slash/", "ctrl\b\f\n\r\t\x01\x1f\x7f",
                    "\u00e9\u00fc\u4e2d\u6587", "\U0001F600 emoji", ""],
        "\u00e9key": "non-ascii key",
        "key with \"quote\"": True,
        "mixed": [1, 1.0, "1", None, True, [], {}],
    }
    with open(os.path.join(OUT, "pyjson.json"), "w") as fp:
        fp.write(dumps(obj))
    special = {"a": float("inf"), "b": float("-inf"), "c": float("nan"), "d": [1e300 * 10]}
    with open(os.path.join(OUT, "special.json"), "w") as fp:
        json.dump({"text": dumps(special)}, fp, indent=1)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
