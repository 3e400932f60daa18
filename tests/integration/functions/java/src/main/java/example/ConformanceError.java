package example;

/** The error type the conformance function raises. */
public class ConformanceError extends RuntimeException {
    public ConformanceError(String message) {
        super(message);
    }
}
