package example;

import com.amazonaws.services.lambda.runtime.Context;
import com.amazonaws.services.lambda.runtime.RequestStreamHandler;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;

/** A RequestStreamHandler: answers the raw event bytes wrapped in a JSON object. */
public class Streams implements RequestStreamHandler {
    @Override
    public void handleRequest(InputStream input, OutputStream output, Context context) throws IOException {
        byte[] event = input.readAllBytes();
        output.write("{\"stream\":".getBytes(StandardCharsets.UTF_8));
        output.write(event);
        output.write("}".getBytes(StandardCharsets.UTF_8));
    }
}
