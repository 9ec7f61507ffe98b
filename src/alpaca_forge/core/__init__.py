"""What every stage shares: errors, records, files, prompt formats, models, examples, configs."""
