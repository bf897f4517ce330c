"""Small shared test data."""

REFERENCE_FILE_TEXT = """{
  "programs": [{"program_id": "ambassadors", "kind": "affiliate",
                "commission": {"type": "percent", "rate": "0.10"}}],
  "affiliates": [{"affiliate_id": "sally", "program_id": "ambassadors", "codes": ["SALLY20"]}]
}"""
