# frozen_string_literal: true

# Raises while it loads: an init error.
class ConformanceError < StandardError; end

raise ConformanceError, 'init failed'
